"""Each job's datasets, prepared by SFTTrainer's own code as a plain SFTTrainer run on that job would prepare them.

SFTTrainer decides once, from its train dataset's first row, whether the loss leaves the prompt out
(`completion_only_loss=None`: yes for prompt-completion rows, no for plain text), and builds every dataset's labels
with that decision. A multi-job trainer gives SFTTrainer the first job's dataset, so a prompt-completion job after
a plain-text one would train on its prompts too (its labels unmasked; a helper's probe found it, 2026-12-05). Here
every job's train and eval datasets are prepared with the decision its own train rows give (`_completion_only`).
"""

from __future__ import annotations


class JobDatasets:
    """Mixin of `MultiJobTrainer`: `job_datasets` and `job_eval_datasets`, {job: SFTTrainer-prepared dataset}."""

    def _prepare_job_datasets(self, jobs, passed_eval, formatting_func) -> None:
        """The jobs' datasets after SFTTrainer's `__init__` prepared the first job's train dataset and `passed_eval`
        (reused for its job where its completion-only rule is the first job's)."""
        self.job_datasets = {jobs[0].name: self.train_dataset}
        for job in jobs[1:]:
            self.job_datasets[job.name] = self._prepare_job_dataset(job.name, job.train_dataset, formatting_func,
                                                                    job.train_dataset)
        self.job_eval_datasets = {
            job.name: self.eval_dataset
            if job.eval_dataset is passed_eval and self._completion_only(job.train_dataset) == self.completion_only_loss
            else self._prepare_job_dataset(f"{job.name} eval", job.eval_dataset, formatting_func, job.train_dataset)
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

    def _prepare_job_dataset(self, name: str, dataset, formatting_func, train_dataset):
        """SFTTrainer's own preparation (tokenisation, chat template, completion mask), errors named by job, with
        the completion-only rule of the job's `train_dataset`, as a plain SFTTrainer on the job decides it for its
        train and eval datasets (in its `__init__` it decides once, from the first job's)."""
        shared, self.completion_only_loss = self.completion_only_loss, self._completion_only(train_dataset)
        try:
            if self.completion_only_loss and formatting_func:
                raise ValueError("a formatting_func converts a prompt-completion dataset to plain text, which "
                                 "completion-only loss cannot mask; format it before, or set "
                                 "completion_only_loss=False")
            return self._prepare_dataset(
                dataset, self.processing_class, self.args, self.args.packing, formatting_func, name
            )
        except Exception as error:
            raise ValueError(f"job {name.split()[0]!r}: SFTTrainer could not prepare its dataset: {error}") from error
        finally:
            self.completion_only_loss = shared

