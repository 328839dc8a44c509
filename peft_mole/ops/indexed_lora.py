"""LoRA deltas of a mixed-adapter batch written as one graph for every batch composition (compiled multi-job steps).

The eager path (`segmented_lora.scatter_row_deltas`) groups the rows by adapter in Python, so its operators depend on
which jobs a step holds and how many rows each has: compiled, every new composition would be a new graph. Here the
composition is data, a tensor of one job index per row, and the delta of row i of job j(i) is

    Δ_i = s_j(i) · B_j(i) A_j(i) dropout_j(i)(x_i)          (Hu et al. 2021, eq. 3, per row)

computed for all rows at once from the jobs' factors stacked in a fixed job order: A (J + 1, r, in) and B
(J + 1, out, r) are gathered per row and applied as two batched products over rows. The last slot, and the slot of
any job without a LoRA on this layer, holds zero factors and s = 0: base-only rows and such jobs' rows get Δ = 0.
Jobs of a smaller rank are padded with zero rows of A and zero columns of B, which add exact zeros. The backward of
the gathers sums each job's rows into its own factors' gradients; a job absent from the step gets a zero gradient.
Each row is its own product, so a row's delta does not depend on the other rows; the numbers agree with the eager
path's per-job `F.linear` to rounding, not bit for bit (tests/multijob/test_compiled_steps.py).

The gathered factors are (rows, r, in + out) per projection: cheap for padded rows, but a packed batch (one adapter
per token) would gather them per token, so it is refused under compiled steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peft_mole.ops.segmented_lora import LoraFactors, constant_on, scaled


def indexed_lora_delta(x: torch.Tensor, row_jobs: torch.Tensor, factors: list[LoraFactors | None]) -> torch.Tensor | None:
    """The per-row LoRA delta of the module docstring for x (rows, ..., in) and row_jobs (rows,) int64 in [0, J], where
    `factors[j]` is job j's LoRA on this layer (None: none) and index J is a base-only row.

    Returns (rows, ..., out) in the factors' dtype, or None when no job has a LoRA here."""
    present = [f for f in factors if f is not None]
    if not present:
        return None
    first = present[0]
    rank = max(f.lora_a.shape[0] for f in present)
    in_features, out_features = first.lora_a.shape[1], first.lora_b.shape[0]
    dtype, device = first.lora_a.dtype, first.lora_a.device
    zero_a = torch.zeros(rank, in_features, dtype=dtype, device=device)
    zero_b = torch.zeros(out_features, rank, dtype=dtype, device=device)
    lora_a = torch.stack([zero_a if f is None else F.pad(f.lora_a, (0, 0, 0, rank - f.lora_a.shape[0]))
                          for f in factors] + [zero_a])  # (J + 1, r, in)
    lora_b = torch.stack([zero_b if f is None else F.pad(f.lora_b, (0, rank - f.lora_b.shape[1]))
                          for f in factors] + [zero_b])  # (J + 1, out, r)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    scaling = constant_on(tuple(0.0 if f is None else f.scaling for f in factors) + (0.0,), opmath, device)
    rows, row_jobs = x.shape[0], row_jobs.to(device)  # no-ops unless the model is split over devices
    dropouts = [None if f is None else f.dropout for f in factors]
    inputs = per_row_dropout(x.to(device, dtype), row_jobs, dropouts).reshape(rows, -1, in_features)
    hidden = torch.bmm(inputs, lora_a.index_select(0, row_jobs).transpose(1, 2))  # (rows, tokens, r)
    hidden = scaled(hidden, scaling.index_select(0, row_jobs).view(rows, 1, 1))
    out = torch.bmm(hidden, lora_b.index_select(0, row_jobs).transpose(1, 2))  # (rows, tokens, out)
    return out.view(*x.shape[:-1], out_features)


def per_row_dropout(x: torch.Tensor, row_jobs: torch.Tensor, dropouts: list[torch.nn.Module | None]) -> torch.Tensor:
    """Each row of x through its own job's dropout (`dropouts[j]`; None: a job that has none here, its rows unused):
    one dropout call per distinct setting, rows chosen by `where`."""
    kinds: dict[tuple, int] = {}  # (type, p, training) -> its first job
    setting = []
    for j, dropout in enumerate(dropouts):
        if dropout is None:
            setting.append(-1)
            continue
        key = (type(dropout), getattr(dropout, "p", 0.0), dropout.training)
        setting.append(kinds.setdefault(key, j))
    if len(kinds) == 1:
        return dropouts[next(iter(kinds.values()))](x)
    which = constant_on(tuple(setting) + (-1,), torch.int64, x.device).index_select(0, row_jobs)
    which = which.view(-1, *([1] * (x.dim() - 1)))
    out = x
    for job in kinds.values():
        out = torch.where(which == job, dropouts[job](x), out)
    return out
