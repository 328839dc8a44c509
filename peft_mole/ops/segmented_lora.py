"""LoRA deltas for a batch whose rows belong to different adapters (mixed-adapter batches).

Every row runs the frozen layer once (`base_out`); each adapter's delta s·B(A(dropout(x))) runs only on its own
rows. Rows of one adapter that are contiguous are sliced (no gather); others are gathered by index. Adapters
whose row blocks have the same size and whose factors the same rank and dtype are stacked: their A and B run as
batched products over adapters (`stacked_linear`) instead of two small products each, with each adapter's
arithmetic that of its own `F.linear`, so a job's numbers do not depend on which jobs share its step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from peft_mole.forward_context import BASE_ROW, RowGroup


@dataclass
class LoraFactors:
    """One adapter's plain LoRA on a layer: s · B A dropout(x)."""

    lora_a: torch.Tensor  # (r, in)
    lora_b: torch.Tensor  # (out, r)
    scaling: float
    dropout: torch.nn.Module


class _StackedLinear(torch.autograd.Function):
    """y_j = x_j W_j^T for x (J, N, in) and W (J, out, in), with the backward `F.linear` has for each j:
    dx_j = dy_j W_j and dW_j = dy_j^T x_j, in that orientation. autograd's own `bmm` backward forms
    dW_j^T = x_j^T dy_j, which rounds differently on small shapes; this way each job's products are its own
    F.linear's, bit for bit (tests/ops/test_experts.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.bmm(x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def stacked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Batched `F.linear` without bias: (J, N, in) × (J, out, in) → (J, N, out), each j exactly F.linear(x_j, W_j)."""
    return _StackedLinear.apply(x, weight)


def scatter_row_deltas(
    base_out: torch.Tensor,
    x: torch.Tensor,
    groups: list[RowGroup],
    delta: Callable[[str, torch.Tensor], torch.Tensor | None],
    factors: Callable[[str], LoraFactors | None] | None = None,
) -> torch.Tensor:
    """base_out + delta(adapter, x[rows]) on each group's rows.

    Args:
        base_out: (batch, ..., out) frozen-layer output for all rows.
        x: (batch, ..., in) layer input.
        groups: row groups from `ForwardContext.row_groups`.
        delta: maps (adapter name, its rows of x) to the delta for those rows, or None for no delta.
        factors: for plain LoRA layers, maps an adapter to its `LoraFactors` (None if it has none here), which
            lets groups of equal size and rank run stacked (`stacked_lora_deltas`).
    """
    batch = base_out.shape[0]
    if len(groups) == 1 and groups[0].num_rows == batch:
        group = groups[0]
        d = None if group.adapter == BASE_ROW else delta(group.adapter, x)
        return base_out if d is None else base_out + d.to(base_out.dtype)
    if consecutive_slices(groups, batch):
        # split/cat: backward is one cat of the input gradients and views of the output gradient, where
        # indexing per group would build a zero-filled full-size gradient for every group
        pieces = x.split([g.num_rows for g in groups])
        deltas: list[torch.Tensor | None] = [None] * len(groups)
        if factors is not None:
            buckets = stacked_lora_deltas(x, pieces, groups, factors)
            if len(buckets) == 1 and len(buckets[0][0]) == len(groups):  # every group in one stack: no cat
                return base_out + buckets[0][1].reshape(base_out.shape).to(base_out.dtype)
            for indices, stacked in buckets:
                for i, d in zip(indices, stacked.unbind(0), strict=True):
                    deltas[i] = d.to(base_out.dtype)
        for i, (group, piece) in enumerate(zip(groups, pieces, strict=True)):
            if deltas[i] is not None:
                continue
            d = None if group.adapter == BASE_ROW else delta(group.adapter, piece)
            shape = (*piece.shape[:-1], base_out.shape[-1])
            deltas[i] = base_out.new_zeros(shape) if d is None else d.to(base_out.dtype)
        return base_out + torch.cat(deltas)
    full = None
    for group in groups:
        if group.adapter == BASE_ROW:
            continue
        d = delta(group.adapter, x[group.rows])
        if d is None:
            continue
        if full is None:
            full = torch.zeros_like(base_out)
        full[group.rows] = d.to(base_out.dtype)
    return base_out if full is None else base_out + full


def stacked_lora_deltas(
    x: torch.Tensor,
    pieces: tuple[torch.Tensor, ...],
    groups: list[RowGroup],
    factors: Callable[[str], LoraFactors | None],
) -> list[tuple[list[int], torch.Tensor]]:
    """s_j · B_j A_j dropout_j(x_j) for the groups that can share batched products, as (group indices, (J, rows,
    ..., out) deltas) per bucket of ≥ 2 groups with the same row count, rank, dtype and device.

    x_j are the consecutive row blocks `pieces` of x; a bucket covering all of x whose adapters share one dropout
    setting draws one mask over x and reads it as a (J, rows · ..., in) view, otherwise the (dropped-out) blocks
    are stacked. Dropout masks are therefore drawn in another order than group by group.
    """
    buckets: dict[tuple, list[int]] = {}
    for i, group in enumerate(groups):
        found = None if group.adapter == BASE_ROW else factors(group.adapter)
        if found is not None:
            key = (group.num_rows, found.lora_a.shape[0], found.lora_a.dtype, found.lora_a.device)
            buckets.setdefault(key, []).append(i)
    results = []
    for indices in buckets.values():
        if len(indices) < 2:
            continue
        chosen = [factors(groups[i].adapter) for i in indices]
        dtype = chosen[0].lora_a.dtype
        first = chosen[0].dropout
        shared_dropout = all(type(f.dropout) is type(first) and getattr(f.dropout, "p", 0) == getattr(first, "p", 0)
                             and f.dropout.training == first.training for f in chosen)
        if shared_dropout and len(indices) == len(groups):  # one dropout call over all of x, then a view
            inputs = first(x.to(dtype)).reshape(len(indices), -1, x.shape[-1])
        else:
            inputs = torch.stack([f.dropout(pieces[i].to(dtype)).reshape(-1, x.shape[-1])
                                  for i, f in zip(indices, chosen, strict=True)])
        scaling = torch.tensor([f.scaling for f in chosen], dtype=dtype, device=x.device).view(-1, 1, 1)
        hidden = stacked_linear(inputs, torch.stack([f.lora_a for f in chosen])) * scaling  # (J, rows·…, r)
        out = stacked_linear(hidden, torch.stack([f.lora_b for f in chosen]))  # (J, rows·…, out)
        results.append((indices, out.view(len(indices), *pieces[indices[0]].shape[:-1], -1)))
    return results


def consecutive_slices(groups: list[RowGroup], batch: int) -> bool:
    """True when the groups are slices that tile rows 0..batch in order (what `mixed_batch` builds)."""
    start = 0
    for group in groups:
        if not isinstance(group.rows, slice) or group.rows.start != start:
            return False
        start = group.rows.stop
    return start == batch


def lora_delta(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dropout: torch.nn.Module
) -> torch.Tensor:
    """s · B A dropout(x) (Hu et al. 2021, eq. 3), computed in the adapter weights' dtype.

    Args:
        x: (..., in); lora_a: (r, in); lora_b: (out, r).
    Returns:
        (..., out) in the adapter dtype.
    """
    h = dropout(x.to(lora_a.dtype))
    return torch.nn.functional.linear(torch.nn.functional.linear(h, lora_a) * scaling, lora_b)
