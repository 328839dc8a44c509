"""Each job's evaluation, as `MultiJobTrainer` methods (a mixin): the loss of the job's adapter on its own eval set
as SFTTrainer's `eval_loss` (`JobEvaluation._eval_loss`), logged as `<job>/eval_loss`, at its `eval_steps` (after
`eval_delay`), at its last step, at the start with `eval_on_start`, and from `trainer.evaluate()`. A job with
`early_stopping_patience` stops when that many evaluations in a row did not improve its best loss.
"""

from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple

import datasets
import torch
from accelerate.utils import send_to_device
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader

from peft_mole.multijob import distributed as dist
from peft_mole.multijob.batching import batch_inputs
from peft_mole.multijob.loss import at_least_fp32
from peft_mole.multijob.run import STOPPED, JobRun
from peft_mole.multijob.trainer_args import temporarily
from peft_mole.quantised_eval import eval_keeping_4bit_training

logger = logging.getLogger("peft_mole.multijob.trainer")  # one logger for the trainer's messages


class EvaluationFailed(RuntimeError):
    """A job's evaluation raised, on this process or another."""


class EvalOutcome(NamedTuple):
    """What a job's evaluation decided: stop it early (its early-stopping patience ran out), or fail it
    (`failure`: why; its evaluation raised). Neither: the job goes on."""

    stop: bool = False
    failure: str | None = None


class JobEvaluation:
    """The trainer's per-job evaluation (see the module docstring); mixed into `MultiJobTrainer`."""

    def _evaluate_on_start(self, runs: list[JobRun]) -> None:
        """`eval_on_start`: evaluate every unfinished job with an eval set before the first step, as Trainer
        evaluates before its first (the loss of the adapter as initialised, or as resumed)."""
        if not self.args.eval_on_start:
            return
        for run in runs:
            if run.finished or run.name not in self.job_eval_datasets:
                continue
            # its eval loader's draws come before its first epoch, as in its run alone (resumed: its data order
            # goes on from the checkpoint)
            drawing = run.data_random.drawing_before_training() if run.global_step == 0 else contextlib.nullcontext()
            with drawing:
                outcome = self._evaluate_job(run, on_start=True)
            if outcome.failure is not None:
                self._fail(run, outcome.failure)
            elif outcome.stop:
                self._finish(run, STOPPED)

    def _evaluate_job(self, run: JobRun, on_start: bool = False) -> EvalOutcome:
        """Log `<job>/eval_loss`; stop when early stopping says so. An evaluation that raises (its eval data, an
        out-of-memory error) gives the reason to fail the job alone, as a training step that raises does. One
        `on_start` never makes a best checkpoint (`JobEvents.record_eval`)."""
        try:
            loss = self._eval_loss(run.name, run.args.per_device_eval_batch_size)
        except EvaluationFailed as error:
            return EvalOutcome(failure=f"its evaluation at step {run.global_step} raised {error}")
        metrics = {f"{run.name}/eval_loss": loss, f"{run.name}/step": run.global_step}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return EvalOutcome(stop=run.record_eval(loss, after_step=not on_start))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """{"<job>/<prefix>_loss": the loss of the job's adapter on its own eval set (`_eval_loss`)}, for every job
        with an eval_dataset; also logged. The jobs carry their eval sets, so `eval_dataset` must be None."""
        if eval_dataset is not None:
            raise TypeError("MultiJobTrainer.evaluate uses each job's own eval_dataset (JobConfig); pass none here")
        metrics = {}
        for job in self.jobs:
            if job.name in self.job_eval_datasets:
                try:
                    metrics[f"{job.name}/{metric_key_prefix}_loss"] = self._eval_loss(
                        job.name, self.args.per_device_eval_batch_size)  # (no job overrides it)
                except EvaluationFailed as error:  # the other jobs' losses are still reported
                    logger.error("job %s: its evaluation raised %s; no %s_loss for it", job.name, error,
                                 metric_key_prefix)
        self.log(dict(metrics))  # Trainer.log adds the epoch to the dict it is given
        # callbacks see them as after Trainer.evaluate (before 2026-12-08 they never did)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """Refused: the jobs are different adapters, and a prediction is one adapter's."""
        raise NotImplementedError(
            "MultiJobTrainer.predict: each job is its own adapter; load one job's folder (output_dir/<job>/) with "
            "PeftModel.from_pretrained(base, path) and predict with a Trainer or SFTTrainer on it")

    @torch.no_grad()
    def _eval_loss(self, name: str, batch_size: int) -> float:
        """Job `name`'s eval loss as SFTTrainer's `eval_loss` on its adapter alone (less a MoE adapter's aux loss):
        each eval batch's mean target-token loss, averaged over the set's examples (a batch's mean counted once per
        example it collated, packed ones included, as Trainer's evaluation loop does; so it depends on the eval batch
        size), over every process's examples (before 2026-12-06: the mean over all target tokens at once). Under
        several processes each row is counted once: the loader does not repeat rows to give every process as many
        batches (accelerate's `even_batches`, which would count them twice); a process with fewer batches just sums
        less. A streaming set is split by `datasets.distributed.split_dataset_by_node`, each process reading its own
        examples (accelerate would otherwise send process 0's batches, repeating rows to fill the last one)."""
        dataset, description = self.job_eval_datasets[name], f"{name} evaluation"
        with temporarily(self, "data_collator", ExampleCounting(self.data_collator)):
            if dist.is_distributed(self.accelerator) and isinstance(dataset, datasets.IterableDataset):
                loader = self._own_examples_loader(dataset, description, batch_size)
            else:
                with temporarily(self.accelerator, "even_batches", False):
                    loader = self._get_dataloader(dataset=dataset, description=description, batch_size=batch_size,
                                                  sampler_fn=self._get_eval_sampler)
        total, rows, error = 0.0, 0, None
        try:
            with eval_keeping_4bit_training(self.model):  # (a 4-bit base's eval mode would end its training)
                for batch in loader:
                    examples = batch.pop(ExampleCounting.KEY)
                    batch = send_to_device(batch, self.args.device)
                    with self.compute_loss_context_manager(), self.accelerator.autocast():
                        out = self.jobs_model(**batch_inputs(batch, name), labels=batch["labels"],
                                              fused_lm_head=True, use_cache=False)
                    batch_loss = -at_least_fp32(out.log_probs).sum() / out.label_mask.sum().clamp(min=1)
                    total += float(batch_loss) * examples
                    rows += examples
        except Exception as raised:  # noqa: BLE001 (every process learns of it below, then the job fails)
            error = f"{type(raised).__name__}: {raised}"
        total, rows, failed = dist.sum_over_processes(
            self.accelerator, torch.tensor([total, float(rows), float(error is not None)], dtype=torch.float64)
        ).tolist()
        if failed:
            raise EvaluationFailed(error or "an error on another process")
        return total / max(rows, 1.0)

    def _own_examples_loader(self, dataset: datasets.IterableDataset, description: str, batch_size: int) -> DataLoader:
        """This process's examples of a streaming eval set, batched with the trainer's collator (not sharded again
        by accelerate)."""
        own = split_dataset_by_node(dataset, rank=self.accelerator.process_index,
                                    world_size=self.accelerator.num_processes)
        collate = self._get_collator_with_removed_columns(self.data_collator, description=description)
        return DataLoader(own, batch_size=batch_size, collate_fn=collate, num_workers=self.args.dataloader_num_workers,
                          pin_memory=self.args.dataloader_pin_memory)


class ExampleCounting:
    """A collator that also gives the number of examples it collated, as `batch[KEY]` (an int): Trainer weights
    each eval batch's loss by it (`losses.repeat(eval_batch_size)`, the last batch cut to the examples left), also
    where padding-free batches pack the examples into one row."""

    KEY = "_peft_mole_examples"

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, features: list) -> dict:
        batch = self.collate(features)
        batch[self.KEY] = len(features)
        return batch
