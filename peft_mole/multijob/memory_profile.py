"""The memory profile of a multi-job run, as a `MultiJobTrainer` method (a mixin): synthetic steps of each kind of
job fit the scheduler's memory model (`MemoryModel.fit_by_profiling`, ASPEN, SPEC.md §3) before the first mixed
step, when `max_memory` is set.
"""

from __future__ import annotations

import torch

from peft_mole.multijob.batching import profile_inputs
from peft_mole.multijob.memory import costliest_selection, measures_resident
from peft_mole.multijob.run import JobRun


class JobMemoryProfile:
    """`_profile_memory` of `MultiJobTrainer` (see the module doc)."""

    def _profile_memory(self, runs: list[JobRun]) -> None:
        """Fit the memory model on synthetic steps of each kind of job (`MemoryModel.fit_by_profiling`), as the
        steps will be: padded rows, or with `padding_free` one packed row (`profile_inputs`)."""
        params = {run.name: list(run.params.values()) for run in runs}
        packed, job_order = bool(getattr(self, "padding_free", False)), list(self.jobs_model.peft_config)

        def step(ids: torch.Tensor, row_jobs: list[str]) -> None:
            inputs = profile_inputs(ids, row_jobs, packed, job_order)
            with self.compute_loss_context_manager(), self.accelerator.autocast():
                out = self.jobs_model(**inputs, use_cache=False, fused_lm_head=True)
            torch.autograd.grad(-out.log_probs.sum(), [p for j in dict.fromkeys(row_jobs) for p in params[j]],
                                allow_unused=True)

        embeddings, kinds = self.model.get_input_embeddings(), {r.name: r.memory_kind for r in runs if not r.finished}
        # a fit of this run's steps alone: another `train()` of this trainer ran with other resident bytes (the
        # moments its jobs then had), and the scheduler lets go of its runs, whose state would be in the peaks
        self.job_scheduler.memory_model.samples.clear()
        self.job_scheduler.runs = runs
        if kinds:  # the jobs that will train (a resumed run's ended jobs do not)
            streams = {run.name: run.stream.get_state() for run in runs if run.stream is not None}
            vocab, length, device = embeddings.num_embeddings, int(self.args.max_length or 512), self.args.device
            varying = {job: self.jobs_model.expert_settings(job) for job in kinds
                       if getattr(self.jobs_model.peft_config[job], "SELECTION_VARIES", False)}
            with costliest_selection(step, torch.device(device), varying, vocab, length, kinds) as costs:  # DynMoLE
                # (a length its steps ran out of memory at is not tried again)
                length = min([cost["tokens"] for cost in costs.values()] + [length])
                self.job_scheduler.memory_model.fit_by_profiling(step, device, vocab, length, kinds, packed=packed)
            for run in runs:  # profiling draws nothing the jobs' training would have drawn
                if run.name in streams:
                    run.stream.set_state(streams[run.name])
                    run.mark_stream()
        self.job_scheduler.profiled(runs, measures_resident(self.args.device))
