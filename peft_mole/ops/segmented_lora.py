"""LoRA deltas for a batch whose rows belong to different adapters (mixed-adapter batches).

Every row runs the frozen layer once (`base_out`); each adapter's delta s·B(A(dropout(x))) runs only on its own
rows. Rows of one adapter that are contiguous are sliced (no gather); others are gathered by index.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from peft_mole.forward_context import BASE_ROW, RowGroup


def scatter_row_deltas(
    base_out: torch.Tensor,
    x: torch.Tensor,
    groups: list[RowGroup],
    delta: Callable[[str, torch.Tensor], torch.Tensor | None],
) -> torch.Tensor:
    """base_out + delta(adapter, x[rows]) on each group's rows.

    Args:
        base_out: (batch, ..., out) frozen-layer output for all rows.
        x: (batch, ..., in) layer input.
        groups: row groups from `ForwardContext.row_groups`.
        delta: maps (adapter name, its rows of x) to the delta for those rows, or None for no delta.
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
        deltas = []
        for group, piece in zip(groups, pieces, strict=True):
            d = None if group.adapter == BASE_ROW else delta(group.adapter, piece)
            shape = (*piece.shape[:-1], base_out.shape[-1])
            deltas.append(base_out.new_zeros(shape) if d is None else d.to(base_out.dtype))
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
