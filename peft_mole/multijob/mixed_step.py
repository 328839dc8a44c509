"""One mixed step of several jobs' micro-batches — forward, each job's loss, backward — and its retries, as
`MultiJobTrainer` methods (a mixin).

A step runs the frozen base once over every part's rows, each adapter on its own rows, and backpropagates
Σ_j L_j with L_j = −Σ log p(target) / N_j + c · aux_j / G_j (the trainer's docstring). Nothing is added to a job's
gradients until the step has succeeded: a step that raises is split in two and retried (`_train_parts`), so an
out-of-memory error shrinks the step, and a job whose micro-batch breaks the forward, or whose loss diverged in a
packed row it shared, fails alone.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from peft_mole.multijob.batching import is_packed, mix, pad_token_id
from peft_mole.multijob.loss import at_least_fp32
from peft_mole.multijob.memory import free_memory, is_oom
from peft_mole.multijob.run import MICRO_BATCH_METRICS, JobRun

logger = logging.getLogger("peft_mole.multijob.trainer")


class NonFiniteInPackedStep(RuntimeError):
    """A packed step of several jobs gave a non-finite loss: retried in smaller steps (`_train_parts`), since the
    other jobs' tokens shared the diverged job's attention row."""


class MixedStepping:
    """The mixed step of `MultiJobTrainer` (a mixin; the trainer holds the jobs model, scheduler and rounds)."""

    def _train_parts(self, parts: list[tuple[JobRun, dict]]) -> None:
        """Forward/backward the mixed batch; on an error split it and retry the halves, so an OOM shrinks the step
        and a job whose batch breaks the forward fails alone (so does a job diverged in a packed step of several,
        `NonFiniteInPackedStep`). A job that runs out of memory alone is retried with its rows in two halves
        (`MicroBatchHalves`: a MixLoRA or DynMoLE job's with its whole micro-batch's router loads). No gradient is
        added until a part succeeds."""
        self._round_streams.restart(parts)  # a piece of a micro-batch draws from where the whole began
        streams = [(run.stream, run.stream.get_state()) for run, _ in parts if run.stream is not None]
        try:
            self._forward_backward(parts)
            return
        except Exception as error:  # noqa: BLE001
            oom, kind, message = is_oom(error), type(error).__name__, str(error)
        for stream, state in streams:  # the retried steps draw from where the failed one began
            stream.set_state(state)
        if oom:  # (outside the except block: its traceback would keep the failed step's graph and activations)
            free_memory()
        if len(parts) == 1:
            run, batch = parts[0]
            if oom and self._retry_in_halves(run, batch):  # the halves' gradients add up to the whole's
                return
            reason = "ran out of memory even alone" if oom else f"its forward raised {kind}"
            self._round_failures[run.name] = f"{reason}: {message}"
            return
        if oom:
            logger.warning("step of %d jobs ran out of memory; retrying in two smaller steps", len(parts))
        else:
            logger.warning("step of %d jobs raised %s: %s; retrying in two smaller steps to find the job",
                           len(parts), kind, message)
        half = len(parts) // 2
        self._train_parts(parts[:half])
        self._train_parts(parts[half:])

    def _forward_mixed(self, parts: list[tuple[JobRun, dict]]):
        """(the mixed batch, the jobs model's outputs) of one step of `parts`: pieces of micro-batches drawing as
        their wholes, MoE halves with their whole's router loads, under the accelerator's autocast (what
        `accelerator.prepare(model)` wraps a plain SFTTrainer's forward in)."""
        mixed = mix({run.name: batch for run, batch in parts}, pad_token_id(self.processing_class),
                    self.jobs_model.peft_config)
        inputs = {k: v.to(self.args.device) if isinstance(v, torch.Tensor) else v
                  for k, v in mixed.model_inputs().items()}
        pieces = self._round_streams.layouts(parts)
        with (self.jobs_model.drawing_pieces(pieces), self.jobs_model.whole_router_loads(self._whole_loads),
              self.compute_loss_context_manager(), self.accelerator.autocast()):
            return mixed, self.jobs_model(**inputs, labels=mixed.labels.to(self.args.device), fused_lm_head=True,
                                          use_cache=False)

    def _forward_backward(self, parts: list[tuple[JobRun, dict]]) -> None:
        started = time.perf_counter()
        mixed, outputs = self._forward_mixed(parts)
        log_probs, label_mask = at_least_fp32(outputs.log_probs), outputs.label_mask
        aux = outputs.get("aux_loss_per_adapter") or {}
        losses, sums = {}, {}
        zero = log_probs.new_zeros(())
        entropy, top1 = outputs.get("entropy", zero), outputs.get("is_top1", zero)  # (SFTTrainer's fused head's)
        summed_processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        coefficient = 1.0 if self.args.router_aux_loss_coef is None else self.args.router_aux_loss_coef  # (no job's)
        for run, _ in parts:
            rows = mixed.index(run.name)
            window_items = torch.as_tensor(run.window_items).clamp(min=1)  # where it is: a copy to a GPU would sync
            loss = -log_probs[rows].sum() / window_items
            if run.name in aux and coefficient:  # as SFTTrainer: the window's mean (and over summing processes)
                loss = loss + coefficient * aux[run.name] / (len(run.window) * summed_processes)
            losses[run.name] = loss
            fields = [loss.detach(), *(t[rows].sum() if t.dim() else t for t in (entropy, top1, label_mask)),
                      aux[run.name].detach() if run.name in aux else zero.new_full((), math.nan)]  # (nan: no aux loss)
            sums[run.name] = torch.stack([t.double() for t in fields])
        # every job's loss, metrics and token count in one read-back: on a GPU each read syncs the step's kernels
        values = torch.stack([sums[r.name] for r, _ in parts])
        read = dict(zip(losses, values.tolist(), strict=True))
        # one packed row of several jobs, without flash's varlen kernels: masked attention (over the whole row, or
        # sdpa_packed's chunks) turns a diverged job's NaN keys and values (or its NaN output gradients) into NaN for
        # the other jobs' tokens (0 · NaN), in their losses or their gradients; nothing is added before these
        # checks, so `_train_parts` retries the jobs in smaller steps until the diverged ones are alone
        shared_row = len(parts) > 1 and is_packed(parts[0][1]) and not self.job_scheduler.isolates_non_finite
        non_finite = [run for run, _ in parts if not math.isfinite(read[run.name][0])]
        if non_finite and shared_row:
            names = ", ".join(run.name for run in non_finite)
            raise NonFiniteInPackedStep(f"the loss of {names} became non-finite in a packed step")
        # a job with a loss scaler (fp16) trains on: its non-finite gradients make the scaler skip the step, as
        # Trainer's does; any other job with a non-finite loss has diverged
        diverged = [run for run in non_finite if run.scaler is None]
        for run in diverged:
            self._round_failures[run.name] = f"its loss became {read[run.name][0]} at step {run.global_step + 1}"
        good = [run for run, _ in parts if run not in diverged]
        if not good:
            return
        params = [p for run in good for p in run.params.values()]
        total = sum(run.scaled(losses[run.name]) for run in good)
        grads = torch.autograd.grad(total, params, allow_unused=True)
        if shared_row and not math.isfinite(torch.nn.utils.get_total_norm([g for g in grads if g is not None])):
            raise NonFiniteInPackedStep("a gradient became non-finite in a packed step of several jobs")
        ready = []  # every job's gradients laid out (what may allocate) before any job's are added: an allocation
        for run in good:  # that runs out of memory leaves no job's added twice when `_train_parts` retries the step
            ready.append(run.laid_out(grads[:len(run.params)]))
            grads = grads[len(run.params):]
        for run, job_grads in zip(good, ready, strict=True):
            run.add_gradients(job_grads)
        seconds = time.perf_counter() - started
        self.step_cost.observe(mixed.input_ids.numel(), seconds)
        for run in good:
            run.stats.seconds += seconds * mixed.share(run.name)
            run.window_tokens += int(read[run.name][3])
            so_far = self._round_sums.get(run.name, [0.0] * (1 + len(MICRO_BATCH_METRICS)))  # (a micro-batch cut
            # into steps: summed over them)
            self._round_sums[run.name] = [a + b for a, b in zip(so_far, read[run.name], strict=True)]


__all__ = ["MixedStepping", "NonFiniteInPackedStep"]
