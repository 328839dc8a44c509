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
per token) would gather them per token; `packed_lora_delta` applies them per job segment instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peft_mole.forward_context import PackedSegments
from peft_mole.ops.experts import _segment_matmul
from peft_mole.ops.job_streams import per_job_dropout, uses_streams
from peft_mole.ops.segmented_lora import LoraFactors, constant_on, dropout_setting, scaled


def indexed_lora_delta(x: torch.Tensor, row_jobs: torch.Tensor, factors: list[LoraFactors | None]) -> torch.Tensor | None:
    """The per-row LoRA delta of the module docstring for x (rows, ..., in) and row_jobs (rows,) int64 in [0, J], where
    `factors[j]` is job j's LoRA on this layer (None: none) and index J is a base-only row.

    Returns (rows, ..., out) in the factors' dtype, or None when no job has a LoRA here."""
    stacked = _stacked(factors)
    if stacked is None:
        return None
    lora_a, lora_b, scaling, dropouts = stacked
    rows, row_jobs = x.shape[0], row_jobs.to(lora_a.device)  # no-ops unless the model is split over devices
    inputs = per_row_dropout(x.to(lora_a.device, lora_a.dtype), row_jobs, dropouts).reshape(rows, -1, lora_a.shape[2])
    hidden = torch.bmm(inputs, lora_a.index_select(0, row_jobs).transpose(1, 2))  # (rows, tokens, r)
    hidden = scaled(hidden, scaling.index_select(0, row_jobs).view(rows, 1, 1))
    out = torch.bmm(hidden, lora_b.index_select(0, row_jobs).transpose(1, 2))  # (rows, tokens, out)
    return out.view(*x.shape[:-1], lora_b.shape[1])


def packed_lora_delta(x: torch.Tensor, token_jobs: torch.Tensor, segments: PackedSegments,
                      factors: list[LoraFactors | None]) -> torch.Tensor | None:
    """The same delta for a packed batch, one job per token: x (1, T, in), token_jobs (T,), and the job segments of
    its tokens (`ForwardContext.segments`).

    Gathering the factors per token would cost (T, r, in + out) per projection; instead each job's segment of the
    job-sorted tokens meets its own factors in one segment product (`ops.segment_ops.segment_linear`, the segment
    ends on the device), as `ops.experts` applies experts, and the result is put back in token order."""
    stacked = _stacked(factors)
    if stacked is None:
        return None
    lora_a, lora_b, scaling, dropouts = stacked
    tokens = x.reshape(-1, x.shape[-1]).to(lora_a.device, lora_a.dtype)
    token_jobs, segments = token_jobs.to(tokens.device), segments.to(tokens.device)
    inputs = per_row_dropout(tokens, token_jobs, dropouts)
    if segments.order is not None:
        inputs, token_jobs = inputs.index_select(0, segments.order[0]), token_jobs.index_select(0, segments.order[0])
    hidden = _segment_matmul(inputs, lora_a, segments.ends)  # (T, r)
    hidden = scaled(hidden, scaling.index_select(0, token_jobs).unsqueeze(1))
    out = _segment_matmul(hidden, lora_b, segments.ends)  # (T, out)
    if segments.order is not None:
        out = out.index_select(0, segments.order[1])
    return out.view(*x.shape[:-1], lora_b.shape[1])


def _stacked(factors: list[LoraFactors | None]) -> tuple | None:
    """(A (J + 1, r, in), B (J + 1, out, r), s (J + 1,) in op-math precision, dropouts) of the jobs' factors in job
    order plus a zero slot for base-only rows; ranks padded with zeros. None when no job has a LoRA here."""
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
    return lora_a, lora_b, scaling, [None if f is None else f.dropout for f in factors]


def per_row_dropout(x: torch.Tensor, row_jobs: torch.Tensor, dropouts: list[torch.nn.Module | None]) -> torch.Tensor:
    """Each row of x through its own job's dropout (`dropouts[j]`; None: a job that has none here, its rows unused):
    one dropout call per distinct setting, rows chosen by `where`; with jobs' own random streams, each job's rows
    drawn from its stream (`ops.job_streams.per_job_dropout`)."""
    if uses_streams(dropouts):
        return per_job_dropout(x, row_jobs, dropouts)
    kinds: dict[tuple, int] = {}  # `dropout_setting` -> its first job
    setting = []
    for j, dropout in enumerate(dropouts):
        if dropout is None:
            setting.append(-1)
            continue
        setting.append(kinds.setdefault(dropout_setting(dropout), j))
    if len(kinds) == 1:
        return dropouts[next(iter(kinds.values()))](x)
    which = constant_on(tuple(setting) + (-1,), torch.int64, x.device).index_select(0, row_jobs)
    which = which.view(-1, *([1] * (x.dim() - 1)))
    out = x
    for job in kinds.values():
        out = torch.where(which == job, dropouts[job](x), out)
    return out
