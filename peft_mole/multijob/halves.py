"""An out-of-memory retry of one job's micro-batch in row halves, as `MultiJobTrainer` methods (a mixin).

A plain-LoRA job's loss is a sum over its rows (÷ the window's target-token count), so its halves' gradients add
up to the whole's. A MixLoRA or DynMoLE job's aux loss is not: per MoE layer the load-balance loss
E · Σ_i f_i · P_i multiplies two means over all the micro-batch's tokens (SPEC.md §1; DynMoLE adds a mean entropy,
§2). Its halves therefore run twice (before 2026-12-06 the job failed instead):

1. without autograd, each half drawing its dropout and jitter as the whole micro-batch does (`pieces`), summing
   every layer's selections per expert and its tokens: the whole's f and |T| (`routing.WholeLoad`);
2. with autograd, each half's aux loss its share of the whole's, E · Σ_i f_i · Σ_{t in the half} p_i(t) / |T|
   (and Σ h(t) / |T| for the entropy), through `MultiJobModel.whole_router_loads`.

Routing is per token and the rows are independent, so the halves select as the whole does, and their losses and
gradients add up to the whole's (a test compares the trained weights with an uncut run). The first pass costs one
forward without autograd, on this rare path only. A half that runs out of memory again is halved with the same
whole loads.
"""

from __future__ import annotations

import logging

import torch

from peft_mole.multijob.batching import row_halves
from peft_mole.multijob.memory import free_memory, is_oom
from peft_mole.multijob.run import JobRun
from peft_mole.routing import WholeLoad

logger = logging.getLogger("peft_mole.multijob.trainer")


class MicroBatchHalves:
    """`_retry_in_halves` and its first pass for MoE jobs (see the module doc)."""

    def _retry_in_halves(self, run: JobRun, batch: dict) -> bool:
        """Train `run`'s micro-batch, which ran out of memory alone, in two row halves (each halved again if it
        runs out too); False where its rows cannot be cut (one row or sequence)."""
        halves = row_halves(batch)
        if halves is None:
            return False
        # a MoE job's aux loss counts (SFTConfig's router_aux_loss_coef 0 drops it: halves add up without loads)
        moe = not self._rows_splittable(run) and (
            self.args.router_aux_loss_coef is None or self.args.router_aux_loss_coef > 0)
        first = moe and not any(job == run.name for job, _ in self._whole_loads)  # not a half of a half
        if first:
            try:
                self._whole_loads.update(self._whole_router_loads(run, halves))
            except Exception as error:  # noqa: BLE001 — even the halves without autograd: the job fails alone
                self._round_failures[run.name] = (f"ran out of memory even alone, and the first pass of its halves "
                                                  f"raised {type(error).__name__}: {error}")
                return True
        logger.warning("job %s ran out of memory alone; retrying its rows in two halves%s", run.name,
                       " (its router loads from a first pass without autograd)" if first else "")
        try:
            for half in halves:
                if run.name not in self._round_failures:
                    self._train_parts([(run, half)])
        finally:
            if first:
                self._whole_loads = {key: load for key, load in self._whole_loads.items() if key[0] != run.name}
        return True

    def _whole_router_loads(self, run: JobRun, halves: tuple[dict, dict]) -> dict[tuple[str, str], WholeLoad]:
        """The first pass: each half forward without autograd (halved again where it runs out of memory), its
        stream restarted and drawing as the whole (`RoundStreams`), every MoE layer's selections and tokens summed
        over the pieces."""
        with self.jobs_model.collecting_router_loads() as loads:
            for half in halves:
                self._add_router_loads(run, half)
        return {key: WholeLoad(counts / counts.sum().clamp(min=1), tokens) for key, (counts, tokens) in loads.items()}

    def _add_router_loads(self, run: JobRun, piece: dict) -> None:
        parts = [(run, piece)]
        self._round_streams.restart(parts)
        try:  # (a forward that fails adds no loads: they are taken after the model's forward)
            with torch.no_grad():
                self._forward_mixed(parts)  # (the fused LM head: the log-probabilities of the labels only)
            return
        except Exception as error:  # noqa: BLE001
            smaller = row_halves(piece) if is_oom(error) else None
            if smaller is None:
                raise
        free_memory()
        for part in smaller:
            self._add_router_loads(run, part)
