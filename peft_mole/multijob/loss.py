"""Per-job loss of a mixed-adapter batch (SPEC.md §3).

    L_j = (Σ token losses of job j's rows) / n_j + aux_j

n_j is job j's own target-token count (over its whole accumulated batch when given), aux_j its adapter's router
auxiliary loss over its own rows. Adapters are disjoint, so backpropagating Σ_j L_j gives every job exactly the
gradients it would get if trained alone on the same rows — the property the multi-job tests check.
"""

from __future__ import annotations

import torch

from peft_mole.multijob.batching import MixedBatch


def per_job_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rows: dict[str, slice] | MixedBatch,
    aux_per_adapter: dict[str, torch.Tensor] | None = None,
    num_items: dict[str, int | torch.Tensor] | None = None,
    aux_coefficient: float = 1.0,
    micro_batches: int = 1,
) -> dict[str, torch.Tensor]:
    """{job: L_j}: L_j = Σ NLL / n_j + c · aux_j / G, as MultiJobTrainer assembles each job's loss of a mixed step
    (SFTTrainer's per job: its aux loss scaled by `router_aux_loss_coef` and averaged over the accumulation window's
    G micro-batches, since each of them adds its own). Padding and untrained tokens (label -100) never count.

    Args:
        logits: (rows, seq, vocab) of the mixed batch; labels: (rows, seq), unshifted.
        rows: job -> its rows, or the `MixedBatch` itself, which a packed batch (one row, each job a span of its
            tokens) needs: its `rows` are token spans, refused here as a dict (before 2026-12-07 they were taken
            as rows: the first job got every job's tokens, the others a loss of 0).
        aux_per_adapter: `outputs.aux_loss_per_adapter`.
        num_items: job -> target tokens of its accumulated batch (gradient accumulation); default: this batch's.
        aux_coefficient: c, SFTConfig's `router_aux_loss_coef` (the trainer takes 1.0 where it is None).
        micro_batches: G, the micro-batches of the job's accumulation window (1 without accumulation).
    """
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an int >= 1 (the accumulation window's), got {micro_batches!r}")
    batch = rows if isinstance(rows, MixedBatch) else None
    rows = batch.rows if batch is not None else rows
    for job, span in rows.items():
        if batch is None and (span.stop or 0) > labels.shape[0]:
            raise ValueError(f"rows[{job!r}] is {span}, past the batch's {labels.shape[0]} row(s): a packed batch's "
                             "spans are tokens; pass the MixedBatch itself (per_job_losses(logits, labels, mixed))")
    # one cross entropy over every row, labels shifted by padding them (as transformers' ForCausalLMLoss): slicing
    # the logits per job would give each job a zero-filled gradient of the whole logits tensor in backward
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    token_losses = torch.nn.functional.cross_entropy(
        at_least_fp32(logits).reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    losses = {}
    for job, row_slice in rows.items():
        where = batch.index(job) if batch is not None else (row_slice,)
        token_sum = token_losses[where].sum()
        count = (shift_labels[where] != -100).sum() if num_items is None else torch.as_tensor(num_items[job])
        loss = token_sum / count.clamp(min=1)
        if aux_per_adapter is not None and job in aux_per_adapter and aux_coefficient:
            loss = loss + aux_coefficient * aux_per_adapter[job] / micro_batches
        losses[job] = loss
    return losses


def at_least_fp32(values: torch.Tensor) -> torch.Tensor:
    """Logits or log-probabilities in fp32, or in their own dtype where it is wider (a float64 model's: SFTTrainer
    keeps its dtype)."""
    return values.to(torch.promote_types(values.dtype, torch.float32))
