"""JobEvents: when one job of a multi-job run logs, evaluates and saves — `transformers.Trainer`'s step rules
(`logging_steps`, `eval_steps`, `save_steps`, the "epoch" strategies, `eval_delay`, `logging_first_step`) applied
to the job's own optimizer steps and epochs, and its early-stopping count.

A mixin of `JobRun`, whose state it reads: `args`, `job`, `global_step`, `max_steps`, `epoch`, `batches_done`,
`batches_per_epoch`, `window`, `window_pos` and `stats`.
"""

from __future__ import annotations

import math

from peft_mole.multijob.trainer_args import option_name


class JobEvents:
    """The step rules of one job (see the module doc)."""

    def _strategy(self, field: str) -> str:
        return option_name(getattr(self.args, field))

    @property
    def evaluated_best(self) -> bool:
        """This step's evaluation gave the job its lowest eval loss so far (`record_eval`): its checkpoint, if
        written, is the best one (`best_checkpoint`)."""
        return self.stats.best_step == self.global_step

    @property
    def at_epoch_end(self) -> bool:
        """The optimizer step just taken closed this job's epoch (its last window is trained)."""
        return self.batches_done >= self.batches_per_epoch and self.window_pos >= len(self.window)

    def should_save(self) -> bool:
        """A checkpoint after this step: `save_strategy` "steps" (every `save_steps`) or "epoch", and the job's last
        step, as Trainer saves at `max_steps` (with "epoch": the epoch it stops in ends there); "best": where this
        step's evaluation gave the job its lowest eval loss so far (called after it), as Trainer."""
        strategy = self._strategy("save_strategy")
        if strategy == "best":
            return self.evaluated_best
        if strategy == "epoch":  # (an early stop ends the epoch it stops in, as Trainer's loop ends it)
            return self.at_epoch_end or self.global_step >= self.max_steps or self.stopping
        if strategy != "steps" or not self.args.save_steps:
            return False
        return self._due(self.args.save_steps) or self.global_step >= self.max_steps

    @property
    def logs_nothing(self) -> bool:
        """`logging_strategy="no"`: no step of this job is logged (but the first with `logging_first_step`)."""
        return self._strategy("logging_strategy") == "no"

    def should_log(self) -> bool:
        """Log after this step: `logging_strategy` "steps" (every `logging_steps`) or "epoch", and the job's last step;
        the first with `logging_first_step`; with "no" none but that first."""
        strategy = self._strategy("logging_strategy")
        if self.global_step == 1 and self.args.logging_first_step:
            return True
        if strategy == "no":
            return False
        if self.global_step == self.max_steps:
            return True
        if strategy == "epoch":
            return self.at_epoch_end
        return strategy == "steps" and self._due(self.args.logging_steps)

    def should_evaluate(self) -> bool:
        """Evaluate (jobs with an eval_dataset) after this step: at each epoch's end with `eval_strategy="epoch"`,
        else every `eval_steps` (default: `logging_steps`) and at the job's last step, as Trainer does; never
        before `eval_delay` epochs or steps. With `eval_strategy="no"` (TRL's default) only a job that asks for
        evaluations itself (its JobConfig's `eval_steps` or `early_stopping_patience`) is evaluated, by steps."""
        strategy = self._strategy("eval_strategy")
        if strategy == "no" and self.job.eval_steps is None and self.job.early_stopping_patience is None:
            return False
        if strategy == "epoch":  # (and the last step, where Trainer ends the epoch it stops in)
            ends = self.at_epoch_end or self.global_step >= self.max_steps
            return ends and self.epoch_progress >= self.args.eval_delay
        if self.global_step < self.args.eval_delay:
            return False
        return self._due(self.args.eval_steps or self.args.logging_steps) or self.global_step >= self.max_steps

    @property
    def epoch_progress(self) -> float:
        """Epochs trained, as a fraction (Trainer's `state.epoch`): 1.0 at the end of the first."""
        return self.epoch + self.batches_done / max(self.batches_per_epoch, 1)

    def every(self, steps: float) -> int:
        """`save_steps`, `eval_steps` or `logging_steps` as a number of this job's optimizer steps (a fraction < 1
        means that share of max_steps, rounded up, as in TrainingArguments)."""
        return max(int(steps if steps >= 1 else math.ceil(steps * self.max_steps)), 1)

    def _due(self, every: float) -> bool:
        """Whether this optimizer step is a multiple of `every` (`every`)."""
        return self.global_step % self.every(every) == 0

    def record_eval(self, loss: float, after_step: bool = True) -> bool:
        """Track the best eval loss; True when `early_stopping_patience` evaluations in a row did not improve it.

        As Trainer with `EarlyStoppingCallback`: the patience counter compares each evaluation with the best of the
        evaluations after a step before it (`best_metric`) and restarts while there is none, so `eval_on_start`'s
        loss is no baseline (before 2026-12-08 it was: a start loss below the first steps' stopped the job at its
        first evaluation); an evaluation after a step whose loss is below that best (a NaN never is, as Trainer's
        best starts at +inf) makes this step the one of the best checkpoint (`best_checkpoint`; before, a first NaN
        loss stayed the best for good)."""
        stats = self.stats
        if stats.best_metric is None or loss < stats.best_metric:  # (Trainer's default threshold 0: strictly lower)
            stats.evals_without_improvement = 0
        else:
            stats.evals_without_improvement += 1
        if not math.isnan(loss) and (stats.best_eval_loss is None or loss < stats.best_eval_loss):
            stats.best_eval_loss = loss  # (the lowest of all, the start's too: a record)
        if after_step and not math.isnan(loss) and (stats.best_metric is None or loss < stats.best_metric):
            stats.best_metric, stats.best_step = loss, self.global_step
        patience = self.job.early_stopping_patience
        return patience is not None and stats.evals_without_improvement >= patience
