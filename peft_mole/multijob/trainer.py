"""MultiJobTrainer: many adapters (jobs) trained at once on one frozen base, as a TRL `SFTTrainer` (SPEC.md §3).

Each step is one mixed-adapter batch: a micro-batch from every running job, one pass of the frozen base for all
rows, each adapter on its own rows. Job j's loss on its rows is

    L_j = −Σ log p(target) / N_j + c · aux_j / G_j

with N_j its target tokens over its whole accumulation window (Trainer's `num_items_in_batch`), G_j the window's
micro-batches and c `router_aux_loss_coef` (SFTTrainer's mean of the aux loss, and its coefficient); the step
backpropagates Σ_j L_j. Adapters are disjoint, so every job gets the gradients it would get trained alone by
`SFTTrainer` with the same data order and seed (tests/multijob/test_trainer.py). Each job then clips, steps and
schedules on its own windows, and logs and checkpoints under its own name.

What comes from SFTTrainer unchanged: dataset preparation (tokenisation, chat templates, completion-only loss),
the collator, the fused LM head, accelerate (device, autocast), callbacks and `log()`. With `padding_free=True` (or
`packing=True` with the "bfd" strategy) each job's micro-batch is one packed row, and a mixed step concatenates
them into one packed row (`packed_mixed_batch`): no padding (`JobScheduler.group_packed` says which share a step).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils.memory import clear_device_cache
from peft import LoraConfig
from transformers import PreTrainedModel, TrainerCallback, TrainerState
from transformers.optimization import get_scheduler
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.trainer_utils import TrainOutput, set_seed
from trl import SFTConfig, SFTTrainer

from peft_mole.multijob import distributed as dist
from peft_mole.multijob import report
from peft_mole.multijob.batching import is_packed, widths_differ
from peft_mole.multijob.best_checkpoint import check_best_model_args, check_job_steps
from peft_mole.multijob.decay import decayed_names
from peft_mole.multijob.evaluation import JobEvaluation
from peft_mole.multijob.flat_parameters import job_optimizer
from peft_mole.multijob.halves import MicroBatchHalves
from peft_mole.multijob.job_data import JobDatasets, data_error
from peft_mole.multijob.job_step import JobStepping
from peft_mole.multijob.jobs import JobConfig
from peft_mole.multijob.lifecycle import JobLifecycle, resumed_log_history
from peft_mole.multijob.memory_profile import JobMemoryProfile
from peft_mole.multijob.mixed_step import MixedStepping, NonFiniteInPackedStep  # noqa: F401 (re-exported)
from peft_mole.multijob.model import MultiJobModel, enable_activation_checkpointing
from peft_mole.multijob.pieces import RoundStreams
from peft_mole.multijob.run import DONE, FAILED, STOPPED, JobRun, stream_seed
from peft_mole.multijob.scheduler import JobScheduler, StepCost
from peft_mole.multijob.trainer_args import (
    JobSetupError,
    check_distributed,
    check_job_schedulers,
    check_optimizer_hooks,
    check_step_overhead_tokens,
    check_trainer_args,
    check_trainer_inputs,
    load_base_model,
    take_accelerate_compile,
    temporarily,
    with_adapters_declared,
    without_aux_coefficient,
    without_init_kwargs,
)
from peft_mole.packed_attention import suggest_packed_attention

logger = logging.getLogger(__name__)


class MultiJobTrainer(JobDatasets, JobEvaluation, JobLifecycle, JobMemoryProfile, JobStepping, MixedStepping,
                      MicroBatchHalves, SFTTrainer):
    """Train several `JobConfig`s together on one frozen base.

    Args:
        model: the base model (or a hub id / local path, loaded as SFTTrainer loads it: `load_base_model`).
        jobs: the jobs; names must be unique.
        args: an `SFTConfig`: the defaults for every job, and the run's `output_dir` (job j writes to
            `output_dir/<j>/`: checkpoints `checkpoint-N/` and the final adapter).
        processing_class: the tokenizer, as for `SFTTrainer`.
        data_collator: as for `SFTTrainer` (default: TRL's language-modeling collator).
        callbacks: Trainer callbacks; they see one step per mixed step and every job's logs, and each job's epoch,
            optimizer-step and save events as its own SFTTrainer run sends them (`multijob.job_step`).
        formatting_func: as for `SFTTrainer`.
        max_concurrent_jobs: run at most this many jobs at a time (by priority, then arrival).
        max_memory: peak-memory budget in bytes for one step, enforced with the fitted memory model
            (`peft_mole.multijob.memory`); None = no limit.
        step_overhead_tokens: what one extra mixed step costs, in padded tokens; the jobs' micro-batches of a
            round are split into steps of similar length when that saves more padding. "auto" (default) fits it
            from the measured step times (`StepCost`; until three are known, each distinct length is its own
            step); None: always one step per round. Unused with `padding_free=True` (no padding to save).
            `args.torch_compile=True` compiles the mixed steps (DynMoLE and MixDoRA blocks run eagerly inside),
            with rows and length dynamic from the first graph where the first round's micro-batches differ in width
            on any process (without `max_memory`), or always with accelerate's `dynamo_use_dynamic: true`.
        **kwargs: passed on to `SFTTrainer` (not `peft_config` or `train_dataset`: jobs carry those).

    Example:
        >>> trainer = MultiJobTrainer(model=base, args=SFTConfig("runs"), jobs=[job_a, job_b])  # doctest: +SKIP
        >>> trainer.train()                                                                    # doctest: +SKIP
    """

    flat_job_parameters = True  # a job's fused optimizer steps one flat tensor per group (`flat_parameters`)

    def __init__(
        self,
        model: PreTrainedModel | str,
        jobs: list[JobConfig],
        args: SFTConfig | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        data_collator: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        formatting_func: Callable | None = None,
        max_concurrent_jobs: int | None = None,
        max_memory: float | None = None,
        step_overhead_tokens: int | str | None = "auto",
        **kwargs: Any,
    ) -> None:
        check_trainer_inputs(model, jobs, callbacks, kwargs)
        check_optimizer_hooks(type(self))
        if args is not None:
            check_trainer_args(args, {j.name: j.peft_config for j in jobs})
            check_best_model_args(args, jobs)
        loaded = isinstance(model, str)
        if loaded:
            model = load_base_model(model, args, kwargs.pop("quantization_config", None))
        default_seed = args.seed if args is not None else SFTConfig.seed
        self.jobs = list(jobs)
        # each job's adapter made after set_seed(its seed), as SFTTrainer makes a job's alone
        self.jobs_model = MultiJobModel(model, {j.name: j.peft_config for j in jobs},
                                        seeds={j.name: default_seed if j.seed is None else j.seed for j in jobs})
        try:  # a set-up that fails gives the base back as it was given, so a corrected trainer can take it
            for job in jobs:  # (a resume then takes each job's checkpoint instead)
                if job.init_adapter is not None:
                    self.jobs_model.load_job(job.name, str(job.init_adapter))
            self.job_scheduler = JobScheduler(max_concurrent_jobs, max_memory)
            check_step_overhead_tokens(step_overhead_tokens)
            self.step_overhead_tokens = step_overhead_tokens
            self.step_cost = StepCost()
            self.padding_stats = report.PaddingStats()
            self._whole_loads: dict = {}  # {(job, layer): WholeLoad} of MoE jobs trained in halves (`MicroBatchHalves`)
            try:
                # an eval_dataset (Trainer refuses an eval_strategy without one), prepared once: that job's reuses it
                first_eval = next((j.eval_dataset for j in jobs if j.eval_dataset is not None), None)
                passed_eval = kwargs.setdefault("eval_dataset", first_eval)
                with without_aux_coefficient(args), without_init_kwargs(args, loaded), with_adapters_declared(model):
                    super().__init__(model=model, args=args, train_dataset=jobs[0].train_dataset, callbacks=callbacks,
                                     processing_class=processing_class, data_collator=data_collator,
                                     formatting_func=formatting_func, **kwargs)
            except (KeyError, ValueError, TypeError) as error:
                raise ValueError(f"job {jobs[0].name!r} (or the trainer arguments): "
                                 f"{data_error(error, jobs[0].train_dataset)}") from error
            check_distributed(self)
            check_job_schedulers(self.args, jobs)
            take_accelerate_compile(self)
            attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
            suggest_packed_attention(attention, bool(getattr(self, "padding_free", False)))
            self._prepare_job_datasets(jobs, passed_eval, formatting_func)
        except BaseException:
            self.jobs_model.unload()
            raise
        self.runs: list[JobRun] = []  # made by train()
        self.job_summary: list[dict] = []

    # ------------------------------------------------------------------ set-up
    def _make_run(self, job: JobConfig) -> JobRun:
        args = job.training_args(self.args)
        set_seed(args.seed)  # the data order of a plain SFTTrainer run with this seed
        with temporarily(self, "args", args):  # Trainer's samplers read self.args: the job's batch, accumulation
            loader = self._get_dataloader(dataset=self.job_datasets[job.name], description=f"{job.name} training",
                                          batch_size=args.per_device_train_batch_size,
                                          sampler_fn=self._get_train_sampler, is_training=True)
        data_state = torch.random.get_rng_state()  # what its data pipeline draws from next (`data_order`)
        if len(loader) == 0:  # (Trainer would train nothing and raise deep in its loop)
            shard = "" if self.accelerator.num_processes == 1 else f" (each of {self.accelerator.num_processes} " \
                "processes gets its share of them)"
            rows = len(self.job_datasets[job.name])
            raise JobSetupError(f"job {job.name!r}: its {rows} rows{shard} make no batch of "
                             f"per_device_train_batch_size={args.per_device_train_batch_size} with "
                             "dataloader_drop_last=True; give it more rows or a smaller batch")
        params = self.jobs_model.job_parameters(job.name)
        decay = decayed_names(self.get_decay_parameter_names, params, job.name, self.jobs_model.prefix)
        groups = [
            {"params": [p for n, p in params.items() if n in decay], "weight_decay": args.weight_decay},
            {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0},
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, self.model)
        optimizer, flat = job_optimizer(optimizer_cls, optimizer_kwargs, groups, args.device, self.flat_job_parameters)
        run = JobRun(job, args, loader, params, optimizer, None, flat=flat, data_state=data_state)
        check_job_steps(run)
        if self.accelerator.scaler is not None:  # fp16 mixed precision: a loss scale of the job's own
            run.scaler = copy.deepcopy(self.accelerator.scaler)
        run.scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.get_warmup_steps(run.max_steps),
            num_training_steps=run.max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        return run

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Train every job to its end; `resume_from_checkpoint=True` continues each job from its latest checkpoint."""
        if resume_from_checkpoint not in (None, False, True):
            raise ValueError("resume_from_checkpoint must be True (each job's latest checkpoint) or None/False")
        self.runs = runs = [self._make_run(job) for job in self.jobs]
        # each job's dropout and jitter from a random stream of its own, seeded by its seed and name (and restored
        # from its checkpoint): its masks do not depend on the jobs sharing its steps (`ops.job_streams`)
        streams = self.jobs_model.set_job_streams({run.name: stream_seed(run.args.seed, run.name) for run in runs})
        for run in runs:
            run.use_stream(streams[run.name])
        self.job_progress: dict[str, str] = {}  # job -> its step and loss in the progress bar
        if resume_from_checkpoint:
            self._resume(runs)
        else:
            self._start_afresh(runs)
        dist.broadcast_parameters(self.accelerator, [p for run in runs for p in run.params.values()])
        set_seed(self.args.seed)
        if getattr(self.args, "activation_checkpointing", self.args.gradient_checkpointing):
            enable_activation_checkpointing(self.model, self.args)
        self.model.train()
        config = getattr(self.model, "config", None)  # (packed steps' limit: as the steps run, compiled or not)
        self.job_scheduler.set_attention(getattr(config, "_attn_implementation", None), self.args.torch_compile, config)
        if self.args.torch_compile:  # one graph for every mixed step
            # `accelerate launch --dynamo_use_dynamic true`: rows and length dynamic from the first graph; false (what
            # `accelerate config` writes by default) is no request: a static graph per shape would recompile each step
            dynamic = getattr(getattr(self.accelerator.state, "dynamo_plugin", None), "dynamic", None) is True
            compile_kwargs = {"backend": self.args.torch_compile_backend, "mode": self.args.torch_compile_mode}
            self.jobs_model.compile_mixed_steps(**compile_kwargs, **({"dynamic": True} if dynamic else {}))
            # else the first round's micro-batches choose (`_train_round`; once: another `train()` keeps it), unless
            # a memory profile's steps of several shapes compile the graphs first
            if not hasattr(self, "_shapes_unseen"):
                self._shapes_unseen = not (dynamic or self.job_scheduler.max_memory)
        if self.job_scheduler.max_memory is not None:  # the steps that will run, compiled ones included (warmed up)
            self._profile_memory(runs)
        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(), is_world_process_zero=self.is_world_process_zero()
        )
        # a resumed run counts on from its jobs' last steps, as Trainer restores global_step, and its log history
        # holds each job's logs up to where it resumed, as Trainer restores it from trainer_state.json
        self.state.global_step = max((run.mixed_step for run in runs), default=0)
        if resume_from_checkpoint:
            self.state.log_history = resumed_log_history(runs)
        self.state.max_steps = self.state.global_step + self.job_scheduler.estimate_steps(runs)
        self.state.logging_steps = self.args.logging_steps
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        self._evaluate_on_start(runs)
        start = time.perf_counter()
        while True:
            running = self.job_scheduler.admit(runs)
            if not running:
                break
            parts = self._next_parts(running)
            if parts:
                self.control = self.callback_handler.on_step_begin(self.args, self.state, self.control)
                for run, _ in parts:  # `include_num_input_tokens_seen`, counted before the step, as Trainer does
                    self._track_num_input_tokens(run.peeked_as_collated())
                self.state.global_step += 1  # the jobs' logs, evaluations and saves in this round carry its number
                self._train_round(parts)
                left = [run for run in runs if not run.finished]  # micro-batches deferred by max_memory take more
                if left:  # steps than estimated: keep max_steps ahead, or the flow callback stops with jobs left
                    estimate = self.state.global_step + self.job_scheduler.estimate_steps(left)
                    if estimate > self.state.max_steps:
                        self.state.max_steps = estimate
                        report.raise_progress_total(self.callback_handler.callbacks, estimate)
                empty_every = self.args.torch_empty_cache_steps
                if empty_every and self.state.global_step % empty_every == 0:
                    clear_device_cache()  # as Trainer does every `torch_empty_cache_steps`
                self.control = self.callback_handler.on_step_end(self.args, self.state, self.control)
                # a stop asked on one process (a callback's wall-clock limit) stops every process at this step: else
                # one would checkpoint (a collective) while the others went on to the next round's (a hang)
                stop = dist.any_process(self.accelerator, [self.control.should_training_stop])[0]
                self.control.should_training_stop = stop
                if stop:
                    self._checkpoint_unfinished(runs)
                    break
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        runtime = time.perf_counter() - start
        self.job_summary = self._summarise(runs)
        losses = [r.stats.last_loss for r in runs if r.stats.last_loss is not None]
        loss = sum(losses) / max(len(losses), 1)  # the mean of the jobs' final losses
        return TrainOutput(self.state.global_step, loss,
                           {"train_runtime": runtime, "train_loss": loss, "jobs": self.job_summary})

    def _next_parts(self, running: list[JobRun]) -> list[tuple[JobRun, dict]]:
        """The next micro-batch of each running job that fits the budget; jobs whose data raised fail, finished jobs
        are saved. Under several processes every decision is agreed (a job fails everywhere if it fails anywhere)."""
        batches, errors = {}, {}
        for run in running:
            try:
                batches[run.name] = run.peek()
            except Exception as error:  # noqa: BLE001 — a job's data must not take the others down
                errors[run.name] = f"its data pipeline raised {type(error).__name__}: {error}"
        failed = dist.any_process(self.accelerator, [run.name in errors for run in running])
        self._sum_window_items([run for run, bad in zip(running, failed, strict=True) if not bad])
        for run, bad in zip(running, failed, strict=True):
            if bad:
                self._fail(run, errors.get(run.name, "its data pipeline raised on another process"))
            elif batches[run.name] is None:
                self._finish(run, STOPPED if run.stopping else DONE)
        candidates = [(run, batches[run.name]) for run in running if not run.finished]
        packed = self.job_scheduler.pack(candidates, lambda ok: dist.every_process(self.accelerator, [ok])[0])
        too_big = dist.any_process(self.accelerator, [run.status == FAILED for run, _ in candidates])
        chosen = [any(r is run for r, _ in packed) for run, _ in candidates]  # (agreed by `pack`, job by job)
        parts = []
        for (run, batch), big, keep in zip(candidates, too_big, chosen, strict=True):
            if big:
                self._fail(run, run.error or "its micro-batch exceeds max_memory on another process")
            elif keep:
                parts.append((run, batch))
        return parts

    def _sum_window_items(self, runs: list[JobRun]) -> None:
        """N_j of the windows the runs fetched this round, summed over processes in one collective (with
        `average_tokens_across_devices`, as Trainer's `num_items_in_batch`), after the processes agreed on which
        jobs failed: every process then takes part with the same jobs."""
        pending = [run for run in runs if run.items_pending]
        if not pending:
            return
        counts = torch.stack([torch.as_tensor(run.window_items) for run in pending])
        if self.args.average_tokens_across_devices:
            counts = dist.sum_over_processes(self.accelerator, counts)
        for run, count in zip(pending, counts, strict=True):
            run.window_items, run.items_pending = count, False

    def _train_round(self, parts: list[tuple[JobRun, dict]]) -> None:
        """Train one micro-batch of every part (in one or more mixed steps), then agree on failures and step the jobs
        whose accumulation window is complete."""
        overhead = self.step_overhead_tokens
        if overhead == "auto":
            overhead = self.step_cost.overhead_tokens()
        self._round_sums: dict[str, list[float]] = {}  # job -> its micro-batch's loss and `MICRO_BATCH_METRICS`
        self._round_failures: dict[str, str] = {}
        if getattr(self, "_shapes_unseen", False):  # compiled steps: rows and length dynamic if the widths vary
            self._shapes_unseen = False
            differ = widths_differ([batch for _, batch in parts])  # on any process: all compile alike
            self.jobs_model.dynamic_steps(dist.any_process(self.accelerator, [differ])[0])
        self.padding_stats.add_micro_batches(parts)
        # a micro-batch cut into steps: each piece draws as the whole (LoRA jobs: their lora_dropout; MixLoRA and
        # DynMoLE jobs, cut on out-of-memory only: their dropout and router jitter)
        self._round_streams = RoundStreams(parts, lambda run: not isinstance(
            config := self.jobs_model.peft_config[run.name], LoraConfig) or config.lora_dropout > 0)
        self._whole_loads = {}
        for run, _ in parts:
            if run.epoch_begun:  # its first micro-batch of an epoch
                run.epoch_begun = False
                self._job_event("on_epoch_begin", run)
        if is_packed(parts[0][1]):
            groups = self.job_scheduler.group_packed(parts)
        else:
            groups = self.job_scheduler.group_by_length(parts, overhead, splittable=self._rows_splittable)
        for group in groups:
            group = [(run, batch) for run, batch in group if run.name not in self._round_failures]
            if group:
                self.padding_stats.add(group)
                self._train_parts(group)
        failed = dist.any_process(self.accelerator, [run.name in self._round_failures for run, _ in parts])
        stepping = []
        for (run, _), bad in zip(parts, failed, strict=True):
            if bad:
                self._fail(run, self._round_failures.get(run.name, "it failed on another process"))
                continue
            loss, *metrics = self._round_sums[run.name]
            run.window_loss += loss
            run.window_metrics.append(metrics)
            if run.consume():
                stepping.append(run)
            else:
                self._job_event("on_substep_end", run)
        self._round_streams = RoundStreams([], bool)  # the round's micro-batches are not kept past it
        # the epoch after this round, before the jobs step: what their logs (Trainer.log adds it) say
        self.state.epoch = max(r.epoch_progress for r in self.runs)
        for run in stepping:
            self._job_step(run)

    def _rows_splittable(self, run: JobRun) -> bool:
        """Plain-LoRA jobs: their loss is a sum over rows (÷ the window's token count), so their micro-batch may run
        in several steps with the same gradient. A router's load-balance loss is not a sum over rows."""
        return isinstance(self.jobs_model.peft_config[run.name], LoraConfig)

    # ------------------------------------------------------------------ saving and reporting
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save every job's adapter in `output_dir/<job>/` (its own PEFT format) with the tokenizer, as SFTTrainer
        saves its one adapter in `output_dir`; each file replaced whole. A failed job, or one whose weights are not
        finite, is left out with a warning: its folder keeps its last good checkpoint."""
        if self.args.should_save:  # (as Trainer: the main process writes)
            self._save_job_folders(output_dir or self.args.output_dir)

    def _summarise(self, runs: list[JobRun]) -> list[dict]:
        rows = report.summary_rows(runs)
        # every process's mixed batches (before 2026-12-06 process 0's alone)
        real, total = dist.sum_over_processes(self.accelerator, torch.tensor(
            [float(self.padding_stats.real), float(self.padding_stats.total)], dtype=torch.float64)).tolist()
        if self.is_world_process_zero():
            report.write_summary(rows, 1.0 - real / total if total else None, self.args.output_dir)
        return rows


__all__ = ["MultiJobTrainer"]
