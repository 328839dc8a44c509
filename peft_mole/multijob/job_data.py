"""Each job's datasets, prepared by SFTTrainer's own code as a plain SFTTrainer run on that job would prepare them.

SFTTrainer decides once, from its train dataset's first row, whether the loss leaves the prompt out
(`completion_only_loss=None`: yes for prompt-completion rows, no for plain text), and builds every dataset's labels
with that decision. A multi-job trainer gives SFTTrainer the first job's dataset, so a prompt-completion job after
a plain-text one would train on its prompts too (its labels unmasked; a helper's probe found it, 2026-12-05). Here
every job's train and eval datasets are prepared with the decision its own train rows give (`_completion_only`).
"""

from __future__ import annotations

import copy

from trl.data_utils import is_conversational


def data_error(error: Exception, dataset) -> str:
    """An error of SFTTrainer's preparation as a sentence: a missing field (a bare `KeyError: 'text'`) is named
    with the dataset's columns and the fields SFTTrainer reads."""
    if not isinstance(error, KeyError):
        return str(error)
    columns = getattr(dataset, "column_names", None)
    have = f" (its columns: {columns})" if columns is not None else ""
    return (f"the dataset has no field {error}{have}; SFTTrainer reads 'text' (args.dataset_text_field), "
            "'messages', or 'prompt' and 'completion'")


class JobDatasets:
    """Mixin of `MultiJobTrainer`: `job_datasets` and `job_eval_datasets`, {job: SFTTrainer-prepared dataset}."""

    def _prepare_job_datasets(self, jobs, passed_eval, formatting_func) -> None:
        """The jobs' datasets after SFTTrainer's `__init__` prepared the first job's train dataset and `passed_eval`
        (reused for its job where its completion-only rule is the first job's)."""
        def shuffled_alike(job) -> bool:  # SFTTrainer's `__init__` shuffled with the trainer's seed, if at all
            return not (self.args.shuffle_dataset and job.seed not in (None, self.args.seed))

        first = jobs[0]
        reuse_first = shuffled_alike(first)
        self.job_datasets = {first.name: self.train_dataset} if reuse_first else {}
        for job in jobs[1:] if reuse_first else jobs:
            self.job_datasets[job.name] = self._prepare_job_dataset(
                job.name, job.train_dataset, formatting_func, job.train_dataset, job.seed, self.args.packing)
        eval_packing = self.args.packing if self.args.eval_packing is None else self.args.eval_packing  # as TRL
        self.job_eval_datasets = {
            job.name: self.eval_dataset
            if job.eval_dataset is passed_eval and shuffled_alike(job)  # (before 2026-12-07 whatever the job's seed)
            and self._completion_only(job.train_dataset) == self.completion_only_loss
            else self._prepare_job_dataset(f"{job.name} eval", job.eval_dataset, formatting_func, job.train_dataset,
                                           job.seed, eval_packing)
            for job in jobs if job.eval_dataset is not None
        }
        for name, dataset in {**self.job_datasets, **self.job_eval_datasets}.items():
            if hasattr(dataset, "__len__") and len(dataset) == 0:
                kind = "eval" if name.endswith("eval") else "training"
                raise ValueError(
                    f"job {name.split()[0]!r}: no {kind} rows are left after SFTTrainer's preparation (rows without "
                    "trainable tokens are dropped; check the completion field)"
                )

    def _completion_only(self, dataset) -> bool:
        """SFTTrainer's rule for a dataset: `completion_only_loss`, or where None, whether it is prompt-completion."""
        if self.args.completion_only_loss is not None:
            return self.args.completion_only_loss
        sample = next(iter(dataset), {})
        return "prompt" in sample and "completion" in sample

    def _prepare_job_dataset(self, name: str, dataset, formatting_func, train_dataset, seed: int | None,
                             packing: bool):
        """SFTTrainer's own preparation (tokenisation, chat template, completion mask), errors named by job, with
        the completion-only rule of the job's `train_dataset`, as a plain SFTTrainer on the job decides it for its
        train and eval datasets (in its `__init__` it decides once, from the first job's), and the job's `seed`
        for `shuffle_dataset` (None: the trainer's)."""
        args = self.args
        if seed is not None:  # a shallow copy, as `JobConfig.training_args` makes (no __post_init__ run again)
            args = copy.copy(self.args)
            args.seed = seed
        job = name.split()[0]
        if args.assistant_only_loss and not is_conversational(next(iter(train_dataset), {})):
            # (SFTTrainer checks only the train dataset it is given, in its __init__: here the first job's)
            raise ValueError(f"job {job!r}: assistant_only_loss=True needs a conversational dataset (messages), as "
                             "SFTTrainer refuses it; this job's is not, so it would train on every token")
        shared, self.completion_only_loss = self.completion_only_loss, self._completion_only(train_dataset)
        try:
            if self.completion_only_loss and formatting_func:
                raise ValueError("a formatting_func converts a prompt-completion dataset to plain text, which "
                                 "completion-only loss cannot mask; format it before, or set "
                                 "completion_only_loss=False")
            return self._prepare_dataset(dataset, self.processing_class, args, packing, formatting_func, name)
        except Exception as error:
            raise ValueError(f"job {job!r}: SFTTrainer could not prepare its dataset: "
                             f"{data_error(error, dataset)}") from error
        finally:
            self.completion_only_loss = shared

