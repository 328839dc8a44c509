"""Evaluation by answer-choice scoring (the papers' multiple-choice protocol, SPEC.md §5)."""

from peft_mole.evaluation.choices import choice_accuracy, choice_scores

__all__ = ["choice_accuracy", "choice_scores"]
