"""Each job's evaluation, as `MultiJobTrainer` methods (a mixin): the mean target-token loss of the job's adapter
on its own eval set, logged as `<job>/eval_loss`, at its `eval_steps` (after `eval_delay`), at its last step, at
the start with `eval_on_start`, and from `trainer.evaluate()`. A job with `early_stopping_patience` stops when that
many evaluations in a row did not improve its best loss.
"""

from __future__ import annotations

import torch

from peft_mole.multijob import distributed as dist
from peft_mole.multijob.batching import batch_inputs
from peft_mole.multijob.run import STOPPED, JobRun


class JobEvaluation:
    """The trainer's per-job evaluation (see the module docstring); mixed into `MultiJobTrainer`."""

    def _evaluate_on_start(self, runs: list[JobRun]) -> None:
        """`eval_on_start`: evaluate every unfinished job with an eval set before the first step, as Trainer
        evaluates before its first (the loss of the adapter as initialised, or as resumed)."""
        if not self.args.eval_on_start:
            return
        for run in runs:
            if not run.finished and run.name in self.job_eval_datasets and self._evaluate_job(run):
                self._finish(run, STOPPED)

    def _evaluate_job(self, run: JobRun) -> bool:
        """Log `<job>/eval_loss`; True when early stopping says stop."""
        loss = self._eval_loss(run.name, run.args.per_device_eval_batch_size)
        metrics = {f"{run.name}/eval_loss": loss, f"{run.name}/step": run.global_step}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return run.record_eval(loss)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """{"<job>/<prefix>_loss": mean target-token loss of the job's adapter on its own eval set}, for every job
        with an eval_dataset; also logged. The jobs carry their eval sets, so `eval_dataset` must be None."""
        if eval_dataset is not None:
            raise TypeError("MultiJobTrainer.evaluate uses each job's own eval_dataset (JobConfig); pass none here")
        metrics = {f"{job.name}/{metric_key_prefix}_loss": self._eval_loss(
            job.name, job.training_args(self.args).per_device_eval_batch_size) for job in self.jobs
            if job.name in self.job_eval_datasets}
        self.log(dict(metrics))  # Trainer.log adds the epoch to the dict it is given
        return metrics

    @torch.no_grad()
    def _eval_loss(self, name: str, batch_size: int) -> float:
        """Mean over job `name`'s eval set's target tokens (and over processes) of its adapter's loss. Under several
        processes each row is counted once: the loader does not repeat rows to give every process as many batches
        (accelerate's `even_batches`, which would count them twice); a process with fewer batches just sums less."""
        even, self.accelerator.even_batches = self.accelerator.even_batches, False
        try:
            loader = self._get_dataloader(dataset=self.job_eval_datasets[name], description=f"{name} evaluation",
                                          batch_size=batch_size, sampler_fn=self._get_eval_sampler)
        finally:
            self.accelerator.even_batches = even
        training, total, count = self.model.training, 0.0, 0
        self.model.eval()
        try:
            for batch in loader:
                with self.compute_loss_context_manager(), self.accelerator.autocast():
                    out = self.jobs_model(**batch_inputs(batch, name), labels=batch["labels"], fused_lm_head=True,
                                          use_cache=False)
                total += float(-out.log_probs.float().sum())
                count += int(out.label_mask.sum())
        finally:
            self.model.train(training)
        total, count = dist.sum_over_processes(
            self.accelerator, torch.tensor([total, float(count)], dtype=torch.float64)
        ).tolist()
        return total / max(count, 1.0)
