"""JobRun: the training state of one job inside a multi-job run — its data position, accumulation window,
optimizer, LR schedule, counters and checkpoints.

The loop it follows is `transformers.Trainer`'s, per job: an epoch is split into windows of
`gradient_accumulation_steps` micro-batches (the last one shorter); the window's target-token count N_j
(`labels[..., 1:] != -100`, as Trainer's `num_items_in_batch`) normalises the loss of each of its micro-batches;
after the window the job clips its own gradient norm and steps its own optimizer and scheduler.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate.data_loader import skip_first_batches
from safetensors.torch import load_file, save_file

from peft_mole.multijob import checkpoint as ckpt
from peft_mole.multijob.batching import strip_padding
from peft_mole.multijob.best_checkpoint import best_checkpoint_path, tracks_best
from peft_mole.multijob.data_order import (
    DATA_ORDER_FILE,
    DataRandomState,
    batch_sampler_of,
    sampler_generator,
    seeded_per_epoch,
)
from peft_mole.multijob.job_events import JobEvents
from peft_mole.multijob.memory import adapter_memory_kind, first_step_state_bytes
from peft_mole.multijob.trainer_args import JobSetupError

logger = logging.getLogger("peft_mole.multijob.trainer")  # one logger for the trainer's messages
WAITING, RUNNING, DONE, FAILED, STOPPED = "waiting", "running", "done", "failed", "stopped_early"
# what each trained micro-batch adds to a job's logs (sums over its rows; the aux loss nan for a job without one)
MICRO_BATCH_METRICS = ("entropy_sum", "top1_count", "target_tokens", "aux_loss")
STREAM_FILE = "random_stream.safetensors"  # a checkpoint's state of the job's random stream
SCALER_FILE = "scaler.pt"  # its loss scaler's state under fp16 mixed precision (Trainer's SCALER_NAME)


def stream_seed(seed: int, name: str) -> int:
    """The seed of job `name`'s random stream: from its seed and its name, so that two jobs of one seed draw apart
    and a job draws the same masks in any run with that seed (a 63-bit integer from SHA-256)."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def in_layout_of(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`grad` with the parameter's strides, as `loss.backward()` stores it (autograd.grad does not): a fused optimizer
    (`adamw_torch_fused`, Trainer's default) reads a gradient in its parameter's layout, and a transposed gradient
    moved weights by the wrong elements (tests/multijob/test_optimizer_layout.py)."""
    return grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)


def input_token_count(batch: dict) -> int:
    """A collated micro-batch's input tokens as SFTTrainer counts them for `num_tokens`: its attention mask's sum, or
    with padding-free rows the packed positions."""
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    return int((batch.get("position_ids") if batch.get("position_ids") is not None else batch["input_ids"]).shape[-1])


@dataclass
class JobStats:
    """What the run summary reports per job."""

    tokens: int = 0  # target tokens trained
    seconds: float = 0.0  # share of step time, by rows x length
    stepped: tuple[int, float] = (0, 0.0)  # (tokens, seconds) as of the last optimizer step, which checkpoints keep
    last_loss: float | None = None
    best_eval_loss: float | None = None
    best_metric: float | None = None  # the lowest eval loss after a step (Trainer's best_metric)
    best_step: int | None = None  # the optimizer step that gave it
    best_checkpoint: str | None = None  # the folder name of the checkpoint of that step (`best_checkpoint`)
    evals_without_improvement: int = 0
    losses: list = field(default_factory=list)  # window losses since the last log
    entropy: list = field(default_factory=list)  # per micro-batch since the last log, as SFTTrainer's metrics
    accuracy: list = field(default_factory=list)
    aux_loss: list = field(default_factory=list)  # the router aux loss the model returned (MixLoRA, DynMoLE jobs)
    num_tokens: int = 0  # input tokens trained (SFTTrainer's `num_tokens`: attention mask or packed positions)

    def clear_logged(self) -> None:
        """Forget the values gathered since the last log (logged now, or never to be)."""
        self.losses, self.entropy, self.accuracy, self.aux_loss = [], [], [], []


class JobRun(JobEvents):
    """One job's progress (when it logs, evaluates and saves: `JobEvents`). `peek()` is the next micro-batch;
    `consume()` marks it trained."""

    def __init__(self, job, args, dataloader, params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                 flat=None, data_state: torch.Tensor | None = None) -> None:
        self.job, self.args, self.dataloader = job, args, dataloader
        self.name = job.name
        self.params = params
        for param in params.values():  # (a `train()` stopped inside a window left its gradients: a resume on the same
            param.grad = None  # trainer would add its first window to them)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.batches_per_epoch = len(dataloader)
        ga = args.gradient_accumulation_steps
        self.updates_per_epoch = max(self.batches_per_epoch // ga + int(self.batches_per_epoch % ga > 0), 1)
        if args.max_steps > 0:
            self.max_steps = args.max_steps
        else:
            self.max_steps = math.ceil(args.num_train_epochs * self.updates_per_epoch)
        self.status = WAITING
        self.error: str | None = None
        self.run_id: str | None = None  # the run that writes the job's checkpoints (`lifecycle`; None: any run's)
        self.mixed_step = 0  # the trainer's step count (mixed steps) at this job's last optimizer step
        self.resumed_logs: list[dict] = []  # its logs up to where a resume took it from (`ckpt.LOG_FILE`)
        self.stopping = False  # an evaluation ran out of `early_stopping_patience`: it ends after this step
        self.global_step = 0
        self.epoch = 0
        self.batches_done = 0  # micro-batches consumed in the current epoch
        self.window: list[dict] = []
        self.collated: list[dict] = []  # the window's micro-batches as the collator gave them (pads included)
        self.window_items = None  # N_j of the current window (this process's count until the trainer sums it)
        self.items_pending = False  # a new window whose N_j is not yet summed over processes
        self.window_pos = 0
        self.window_loss = 0.0  # Σ of the window's micro-batch losses = the job's loss for this optimizer step
        self.window_tokens = 0  # this process's target tokens trained in the window (summed over processes at its step)
        self.window_metrics: list[list[float]] = []  # per trained micro-batch: this process's `MICRO_BATCH_METRICS`
        self.window_input_tokens = 0  # this process's input tokens in the window (SFTTrainer's `num_tokens`)
        self.stats = JobStats()
        self._iterator = None
        self.last_grad_norm: torch.Tensor | None = None  # the gradient norm of the last step, before clipping
        self.epoch_begun = False  # an epoch's first window was fetched (the trainer sends `on_epoch_begin`)
        self.step_epoch = 0.0  # `epoch_progress` as of the last optimizer step (Trainer's `state.epoch`)
        self.last_lr = 0.0
        self.flat = flat  # FlatGroups when the optimizer steps flat tensors (`multijob.flat_parameters`)
        self.memory_kind = adapter_memory_kind(job.peft_config)  # its rows' kind in the scheduler's memory model
        self.released = False  # optimizer state and gradients freed at the job's end (`release`)
        self.stream: torch.Generator | None = None  # its dropout/jitter generator (`use_stream`)
        self.scaler: torch.amp.GradScaler | None = None  # its own loss scaler under fp16 mixed precision (`scaled`)
        self._stream_at_step: torch.Tensor | None = None
        # its data pipeline's random state (`data_order`): `data_state`, the state after `set_seed(its seed)`
        self.data_random = DataRandomState(data_state, sampler_generator(dataloader))

    # ------------------------------------------------------------------ data
    @property
    def finished(self) -> bool:
        return self.status in (DONE, FAILED, STOPPED)

    def micro_batches_left(self) -> int:
        """Micro-batches still to train (for the progress bar's total)."""
        if self.finished:
            return 0
        epochs_left = math.ceil(self.max_steps / self.updates_per_epoch)
        total = min(self.max_steps * self.args.gradient_accumulation_steps, epochs_left * self.batches_per_epoch)
        done = self.epoch * self.batches_per_epoch + self.batches_done - (len(self.window) - self.window_pos)
        return max(total - done, 0)

    def _start_epoch(self, skip: int = 0) -> None:
        loader = self.dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        # (accelerate's set_epoch does not reach a batch sampler in its shard on several processes: as Trainer does)
        batches = batch_sampler_of(loader)
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(self.epoch)
        if skip:
            loader = skip_first_batches(loader, skip)
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epoch)
        self._iterator = self.data_random.start_iterator(loader, self.epoch)
        self.epoch_begun = True

    def _next_window(self) -> bool:
        """Fetch the next accumulation window; False when the job has trained `max_steps` steps or stops early
        (`stopping`, also as resumed from the checkpoint of the step it stopped at, where a kill came before its
        final folder was written: before 2026-12-08 it trained on)."""
        if self.global_step >= self.max_steps or self.stopping:
            return False
        if self.batches_done >= self.batches_per_epoch:
            self.epoch += 1
            self.batches_done = 0
            self._iterator = None
        if self._iterator is None:
            self._start_epoch(self.batches_done)
        n = min(self.args.gradient_accumulation_steps, self.batches_per_epoch - self.batches_done)
        with self.data_random.drawing():  # (a sampler's permutation is drawn at its first batch)
            raw = [next(self._iterator) for _ in range(n)]
        self.window_input_tokens = sum(input_token_count(batch) for batch in raw)
        self.window = [strip_padding(batch) for batch in raw]  # (a packed row's trailing pads)
        self.collated = raw
        self.window_metrics = []
        self.batches_done += n
        # this process's count; the trainer sums it over processes once every process has its window (a collective
        # here would be skipped by a process whose data raised, and the processes' collectives would fall out of step)
        self.window_items = sum((b["labels"][..., 1:] != -100).sum() for b in self.window)
        self.items_pending = True
        self.window_pos = 0
        return True

    def peek(self) -> dict | None:
        """The next micro-batch (fetching a new window when the last is done), or None when the job is done.
        Exceptions from the data pipeline propagate: the trainer fails this job only."""
        if self.window_pos >= len(self.window) and not self._next_window():
            return None
        return self.window[self.window_pos]

    def peeked_as_collated(self) -> dict:
        """The peeked micro-batch as the collator gave it, before `strip_padding`: what Trainer counts for
        `include_num_input_tokens_seen` (before 2026-12-08 a padding-free job's trailing pads went uncounted)."""
        return self.collated[self.window_pos]

    def consume(self) -> bool:
        """Mark the peeked micro-batch trained; True when it completed the window (time to step)."""
        self.window_pos += 1
        return self.window_pos >= len(self.window)

    # ------------------------------------------------------------------ optimisation
    def stepped_tensors(self) -> list[torch.nn.Parameter]:
        """What the optimizer steps: the job's flat tensors, or its parameters."""
        return self.flat.tensors if self.flat is not None else list(self.params.values())

    def is_finite(self) -> bool:
        """Whether every tensor the optimizer steps is finite (one read-back): a non-finite gradient with a finite
        loss (padded steps check only losses) makes the next step's weights NaN, which no checkpoint may keep."""
        tensors = self.stepped_tensors()
        return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def laid_out(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """`grads` (of `params`, in their order) ready for `add_gradients`: each that becomes a parameter's first
        gradient in the parameter's layout (`in_layout_of`, a copy where the strides differ). The trainer lays out
        every job's of a step before it adds any, so what may run out of memory runs before anything is added."""
        if self.flat is not None:  # (its buffers exist: adding allocates nothing)
            return list(grads)
        return [grad if grad is None or param.grad is not None else in_layout_of(param, grad)
                for param, grad in zip(self.params.values(), grads, strict=True)]

    def add_gradients(self, grads: list[torch.Tensor | None]) -> None:
        """Accumulate one backward's gradients of `params` (in their order; None: no gradient), as `laid_out` gives
        them: nothing is allocated here."""
        if self.flat is not None:
            self.flat.add_gradients(list(self.params.values()), grads)
            return
        for param, grad in zip(self.params.values(), grads, strict=True):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad.add_(grad)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: times the job's loss scale under fp16 mixed precision (as
        `accelerator.backward` scales a Trainer's), else as it is."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def optimizer_step(self, event: Callable[[str], None] = lambda name: None) -> None:
        """Clip this job's gradient norm, step its optimizer and LR schedule, clear its gradients, as Trainer does;
        `event` is called with "on_pre_optimizer_step" and "on_optimizer_step" around the optimizer's step. The norm
        before clipping is kept (`last_grad_norm`), also with `max_grad_norm=0` (no clipping), as Trainer logs it.
        Under fp16 mixed precision the gradients are unscaled first, and a step whose gradients are not finite is
        skipped and the scale backed off, as Trainer's GradScaler does; the learning-rate schedule steps unless
        the scaler skipped the optimizer's step call, the rule accelerate gives Trainer (a fused optimizer skips
        inside its step, so its schedule steps on, as in Trainer; before 2026-12-07 it fell one step behind)."""
        params = [p for p in self.stepped_tensors() if p.grad is not None]
        scaler = self.scaler if params else None  # (no gradient: nothing to unscale or check)
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if params:
            max_norm = self.args.max_grad_norm
            if max_norm and max_norm > 0:
                self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            else:
                self.last_grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.last_lr = self.scheduler.get_last_lr()[0]  # the rate this step used (what Trainer logs)
        event("on_pre_optimizer_step")
        if scaler is None:
            self.optimizer.step()
            stepped = True
        else:  # skipped where the scaler does not call the optimizer's step, as accelerate tells Trainer; a fused
            # optimizer's step is always called (it skips inside its kernel), so its schedule steps, as Trainer's
            called, step = [], self.optimizer.step
            # (`wraps`: the scaler reads the step's signature, e.g. for an optimizer taking `grad_scaler=`)
            self.optimizer.step = functools.wraps(step)(lambda *a, **kw: (called.append(True), step(*a, **kw))[1])
            try:
                scaler.step(self.optimizer)
            finally:
                self.optimizer.step = step  # (the LR scheduler's wrapper of it, which it checks, kept)
            scaler.update()
            stepped = bool(called)
        event("on_optimizer_step")
        if stepped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.step_epoch = self.epoch_progress
        self.mark_stream()
        self.data_random.mark_step()

    def use_stream(self, stream: torch.Generator) -> None:
        """Draw this job's dropout and jitter from `stream` (`MultiJobModel.set_job_streams`)."""
        self.stream = stream
        self.mark_stream()

    def mark_stream(self) -> None:
        """Note the stream's state as of now, the last optimizer step: what a checkpoint keeps (the draws of a
        window begun since are drawn again when a resumed run trains that window again)."""
        self._stream_at_step = None if self.stream is None else self.stream.get_state()

    def stream_state(self) -> torch.Tensor | None:
        """The stream's state as of the last optimizer step (`mark_stream`), on this process: each process draws
        over its own rows, so the processes' states differ (`save_checkpoint` keeps every process's)."""
        return self._stream_at_step

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None
        if self.flat is not None:
            self.flat.zero_grad()

    def resident_bytes(self) -> int:
        """Bytes this job keeps from step to step besides its weights: its optimizer's state and its gradients, and
        for a running job that has not stepped yet the state it is about to create (`held_bytes`). 0 once released
        (`release`)."""
        return sum(self.held_bytes())

    def held_bytes(self) -> tuple[int, int]:
        """(kept, coming): the optimizer state and gradients the job keeps now (the flat buffers made with the job,
        or the gradients accumulated so far in a window), and the state a running job that has not stepped yet
        creates at its first step (`memory.first_step_state_bytes`, per kind of optimizer). (0, 0) once
        released."""
        if self.released:
            return 0, 0
        tensors = self.stepped_tensors()
        state = sum(v.nbytes for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        gradients = self.flat.gradient_bytes if self.flat is not None else sum(
            p.grad.nbytes for p in tensors if p.grad is not None)  # between a window's micro-batches
        if state or self.status != RUNNING:
            return state + gradients, 0
        return gradients, first_step_state_bytes(self.optimizer, tensors)

    def release(self) -> None:
        """Free what only further training needs, once the job has ended: its optimizer's state and its gradients
        (its adapter and checkpoints stay). The scheduler's memory budget counts them no more (`resident_bytes`)."""
        self.optimizer.state.clear()
        self.zero_grad()
        if self.flat is not None:
            self.flat.release_gradients()
        self.released = True

    def learning_rate(self) -> float:
        """The learning rate of the last optimizer step."""
        return self.last_lr

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The position as of the last optimizer step: a window begun but not stepped (a run stopped in the middle
        of one) is not counted, so a resumed run trains it again from its first micro-batch."""
        return {
            "name": self.name,
            "status": self.status,
            "global_step": self.global_step,
            "mixed_step": self.mixed_step,
            "max_steps": self.max_steps,
            "epoch": self.epoch,
            "batches_done": self.batches_done - (len(self.window) if self.window_pos < len(self.window) else 0),
            "tokens": self.stats.stepped[0],  # (a window begun and not stepped is trained again on resume)
            "seconds": self.stats.stepped[1],
            "input_tokens": self.stats.num_tokens,  # (counted at optimizer steps)
            "last_loss": self.stats.last_loss,
            "best_eval_loss": self.stats.best_eval_loss,
            "best_metric": self.stats.best_metric,
            "best_global_step": self.stats.best_step,
            "best_model_checkpoint": self.stats.best_checkpoint,
            "evals_without_improvement": self.stats.evals_without_improvement,
            "stopping": self.stopping,
            "error": self.error,
            "run_id": self.run_id,
            "saved_at": time.time(),
        }

    def mark_best_checkpoint(self) -> None:
        """Before this step's checkpoint is written, on every process (process zero alone writes it): it is the job's
        best where this step's evaluation gave the lowest eval loss so far (`best_checkpoint`; the loss is every
        process's, so they agree)."""
        if tracks_best(self.args) and self.evaluated_best:
            self.stats.best_checkpoint = f"checkpoint-{self.global_step}"

    def save_checkpoint(self, save_adapter, model_only: bool | None = None,
                        stream_states: torch.Tensor | None = None, logs: Callable[[], list[dict]] | None = None) -> str:
        """Write `output_dir/<job>/checkpoint-<step>/` atomically: adapter, optimizer, scheduler, position and the
        state of the job's random stream (`STREAM_FILE`), so that resume draws the masks the run would have:
        `stream_states` (processes, state size) holds every process's (`distributed.gather_rows`), else this
        process's alone is kept. `model_only` (default: `save_only_model`): the adapter and the position only,
        which resume refuses. `logs()`: the job's entries of the run's log history so far (`ckpt.LOG_FILE`), read
        where the checkpoint is written."""
        final = os.path.join(self.args.output_dir, f"checkpoint-{self.global_step}")

        def write(tmp: str) -> None:
            save_adapter(tmp)
            if logs is not None:
                ckpt.write_json(os.path.join(tmp, ckpt.LOG_FILE), logs())
            if self.args.save_only_model if model_only is None else model_only:  # as Trainer's `save_only_model`
                ckpt.write_json(os.path.join(tmp, ckpt.STATE_FILE), {**self.state_dict(), "model_only": True})
                return
            state = self.optimizer.state_dict()  # saved in a plain Trainer's per-tensor layout
            torch.save(state if self.flat is None else self.flat.per_tensor_state(state),
                       os.path.join(tmp, "optimizer.pt"))
            torch.save(self.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            if self.scaler is not None:
                torch.save(self.scaler.state_dict(), os.path.join(tmp, SCALER_FILE))
            if self.stream is not None:  # where its dropout masks and jitter go on, as of its last step
                states = self._stream_at_step[None] if stream_states is None else stream_states
                save_file({"state": states[0].clone(), "per_process": states.clone()},
                          os.path.join(tmp, STREAM_FILE))
            position = self.state_dict()
            mid_epoch = position["batches_done"] < self.batches_per_epoch
            save_file(self.data_random.resume_state(mid_epoch), os.path.join(tmp, DATA_ORDER_FILE))
            ckpt.write_json(os.path.join(tmp, ckpt.STATE_FILE), position)  # last: marks it complete

        ckpt.write_atomically(final, write)
        ckpt.prune_checkpoints(self.args.output_dir, self.args.save_total_limit, self.run_id,
                               self.stats.best_checkpoint)
        return final

    def restore_account(self, state: dict) -> None:
        """What the run summary and logs count (tokens, seconds, last loss, input tokens) and the mixed step, from a
        saved `state_dict`."""
        self.stats.tokens, self.stats.seconds = state.get("tokens", 0), state.get("seconds", 0.0)
        self.stats.stepped, self.stats.last_loss = (self.stats.tokens, self.stats.seconds), state.get("last_loss")
        self.mixed_step = state.get("mixed_step", 0)
        self.stats.num_tokens = state.get("input_tokens", 0)

    def load_checkpoint(self, path: str, load_adapter, process: tuple[int, int] = (0, 1)) -> None:
        """Restore from `save_checkpoint`'s folder (tensors only: `weights_only=True`). `process`: (this process's
        index, the number of processes); a checkpoint written by as many processes gives each its own stream
        state, else every process takes process 0's (with another number of processes the shards differ too)."""
        state = ckpt.read_json(os.path.join(path, ckpt.STATE_FILE))
        if state.get("model_only"):
            raise JobSetupError(
                f"job {self.name!r}: {path} was written with save_only_model=True and holds the adapter only (no "
                "optimizer, scheduler or random stream), so training cannot continue exactly from it; train the job "
                "again from the start, or start a new job from that adapter"
            )
        load_adapter(path)
        optimizer_state = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
        self.optimizer.load_state_dict(optimizer_state if self.flat is None else self.flat.flat_state(optimizer_state))
        self.scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
        if self.scaler is not None and os.path.exists(os.path.join(path, SCALER_FILE)):
            self.scaler.load_state_dict(torch.load(os.path.join(path, SCALER_FILE), weights_only=True))
        if self.stream is not None and os.path.exists(os.path.join(path, STREAM_FILE)):
            saved = load_file(os.path.join(path, STREAM_FILE))
            states = saved.get("per_process")
            index, count = process
            own = states[index].clone() if states is not None and len(states) == count else saved["state"]
            self.stream.set_state(own)  # (a row of `states` is a view, whose storage offset set_state ignores)
            self.mark_stream()
        if os.path.exists(os.path.join(path, DATA_ORDER_FILE)):
            self.data_random.load(load_file(os.path.join(path, DATA_ORDER_FILE)))
        elif not seeded_per_epoch(self.dataloader):  # (written before 2026-12-06)
            logger.warning("job %r: %s has no %s (written before 2026-12-06), so the resumed run's data order is not "
                           "the uninterrupted run's", self.name, path, DATA_ORDER_FILE)
        self.global_step, self.epoch, self.batches_done = state["global_step"], state["epoch"], state["batches_done"]
        self.restore_account(state)
        self.stats.best_eval_loss = state.get("best_eval_loss")
        self.stats.best_metric, self.stats.best_step = state.get("best_metric"), state.get("best_global_step")
        best = state.get("best_model_checkpoint")
        if best is not None and best_checkpoint_path(self.args.output_dir, best) is None:  # as Trainer's resume
            logger.warning("job %r: its best checkpoint %s is gone from %s; the resumed run keeps the best of its own "
                           "checkpoints", self.name, best, self.args.output_dir)
            best = None
        self.stats.best_checkpoint = best
        self.stats.evals_without_improvement = state.get("evals_without_improvement", 0)
        self.stopping = state.get("stopping", False)
        self.window, self.window_pos, self._iterator = [], 0, None
        self.step_epoch = self.epoch_progress
