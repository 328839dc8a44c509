"""Evaluation: the papers' commonsense protocol (SPEC.md §5) and answer-choice scoring for the demo tasks."""

from peft_mole.evaluation.choices import choice_accuracy, choice_scores
from peft_mole.evaluation.commonsense import TASKS, evaluate_commonsense, format_prompt, load_task

__all__ = ["TASKS", "choice_accuracy", "choice_scores", "evaluate_commonsense", "format_prompt", "load_task"]
