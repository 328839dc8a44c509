"""LoRA deltas for a batch whose rows belong to different adapters (mixed-adapter batches).

Every row runs the frozen layer once (`base_out`); each adapter's delta s·B(A(dropout(x))) runs only on its own
rows. Rows of one adapter that are contiguous are sliced (no gather); others are gathered by index. Adapters
whose factors have the same rank and dtype share their products: A and B run as batched products over adapters
(`stacked_linear`) when their row blocks have the same size, else as grouped products over row segments
(`grouped_linear`, `torch._grouped_mm`, on CPU), instead of two small products each; each adapter's arithmetic
is that of its own `F.linear`, so a job's numbers do not depend on which jobs share its step.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from peft_mole.forward_context import BASE_ROW, RowGroup
from peft_mole.ops.job_streams import dropout_pieces
from peft_mole.ops.profiling import profiled


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


class _StackedLora(torch.autograd.Function):
    """Δ_j = F.linear(F.linear(x_j, A_j) · s_j, B_j) for x (J, N, in), A_j (r, in), B_j (out, r), s (J, 1, 1): the two
    `_StackedLinear` products and `scaled` between them as one autograd node, the factors stacked inside. The
    products are those of `_StackedLinear` (F.linear's orientation) and the scaling's backward is autograd's for
    `scaled`, so the numbers are the same bit for bit (tests/ops/test_experts.py); what it saves is host time: one
    Python node per projection instead of two, and no stack, multiply or cast nodes. A multi-job step makes one
    call per projection and layer, and on a GPU those steps are bound by such host work (docs/performance.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scaling: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        jobs = len(factors) // 2
        lora_a, lora_b = torch.stack(factors[:jobs]), torch.stack(factors[jobs:])
        hidden = scaled(torch.bmm(x, lora_a.transpose(1, 2)), scaling)
        ctx.save_for_backward(x, scaling, lora_a, lora_b, hidden)
        # the factors themselves for a second derivative (inputs, so no reference cycle; not saved tensors, which
        # a memory meter of saved bytes would count as the step's, and which hold nothing a step did not have)
        ctx.factors = factors
        return torch.bmm(hidden, lora_b.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scaling, lora_a, lora_b, hidden = ctx.saved_tensors
        jobs, factors = lora_a.shape[0], ctx.factors
        if torch.is_grad_enabled():  # create_graph: the stacks and `hidden` made again from the inputs, so that a
            # second derivative sees every path (through the saved ones, made inside `forward`, it lost their terms:
            # a review's probe, 2026-12-07); a plain backward uses the saved ones
            lora_a, lora_b = torch.stack(factors[:jobs]), torch.stack(factors[jobs:])
            hidden = scaled(torch.bmm(x, lora_a.transpose(1, 2)), scaling)
        needs_a, needs_b = any(ctx.needs_input_grad[2:2 + jobs]), any(ctx.needs_input_grad[2 + jobs:])
        grad_b = torch.bmm(grad.transpose(1, 2), hidden).unbind(0) if needs_b else (None,) * jobs
        grad_hidden = scaled(torch.bmm(grad, lora_b), scaling)
        grad_x = torch.bmm(grad_hidden, lora_a) if ctx.needs_input_grad[0] else None
        grad_a = torch.bmm(grad_hidden.transpose(1, 2), x).unbind(0) if needs_a else (None,) * jobs
        return grad_x, None, *grad_a, *grad_b


def stacked_lora(x: torch.Tensor, scaling: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor]):
    """s_j · B_j A_j x_j for x (J, N, in), each job's (r, in) A_j and (out, r) B_j, and s (J,) in float32 (float64
    for float64 factors): each job's numbers are those of F.linear(F.linear(x_j, A_j) · s_j, B_j), also under
    autocast, where the products run as two `stacked_linear` calls instead of one `_StackedLora` node."""
    if torch.is_autocast_enabled(x.device.type):
        hidden = stacked_linear(x, torch.stack(lora_a))
        return stacked_linear(scaled(hidden, scaling.view(-1, 1, 1)), torch.stack(lora_b))
    return _StackedLora.apply(x, scaling.view(-1, 1, 1), *lora_a, *lora_b)


def stacked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Batched `F.linear` without bias: (J, N, in) × (J, out, in) → (J, N, out), each j exactly F.linear(x_j, W_j),
    also under autocast (see `as_linear_under_autocast`)."""
    if not torch.is_autocast_enabled(x.device.type):  # the context manager's own cost, saved on the hot path
        return _StackedLinear.apply(x, weight)
    with as_linear_under_autocast(x, weight) as (x, weight):
        return _StackedLinear.apply(x, weight)


@contextlib.contextmanager
def as_linear_under_autocast(x: torch.Tensor, weight: torch.Tensor):
    """The operands as autocast hands them to `F.linear` where it is on for x's device (every floating tensor but
    float64 cast to its dtype, differentiably), with autocast off inside, so a product written with `bmm` or
    `_grouped_mm` computes what `F.linear` would: same dtype, same backward dtypes (autocast treats those ops
    differently or not at all)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        yield x, weight
        return
    cast = [t.to(linear_dtype(device, t.dtype)) for t in (x, weight)]
    with torch.autocast(device, enabled=False):
        yield cast[0], cast[1]


def linear_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype `F.linear` computes in for operands of `dtype`: autocast's where it is on (float64 is left alone)."""
    if torch.is_autocast_enabled(device_type) and dtype.is_floating_point and dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return dtype


def constant_on(values: tuple[float | int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a tensor on `device`, made once per (values, dtype, device) and reused. Building it at every call
    would be a host-to-device copy per projection and step, which PyTorch follows with a stream sync on CUDA: 154
    syncs per forward of a 22-layer multi-job model. Made outside inference mode, so that a tensor first built
    during evaluation can still be saved for a later training backward."""
    if torch.compiler.is_compiling():  # traced as a constant of the graph
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_constant(values, dtype, torch.device(device))


@functools.lru_cache(maxsize=256)
def _cached_constant(values: tuple[float | int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def scaled(hidden: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
    """hidden · s with s (one value per row, in float32/float64) as a Python-float `hidden * s` computes it: in the
    op-math precision, rounded once to hidden's dtype (a bf16 s would be rounded itself first)."""
    return (hidden * scaling).to(hidden.dtype)


@profiled("peft_mole::lora_deltas")
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
        return base_out if d is None else add_delta(base_out, d)
    if consecutive_slices(groups, batch):
        # split/cat: backward is one cat of the input gradients and views of the output gradient, where
        # indexing per group would build a zero-filled full-size gradient for every group
        deltas: list[torch.Tensor | None] = [None] * len(groups)
        if factors is not None:
            buckets = stacked_lora_deltas(x, groups, factors)
            if len(buckets) == 1 and len(buckets[0][0]) == len(groups):  # every group in one bucket: no cat
                return add_delta(base_out, buckets[0][1].reshape(base_out.shape))
            for indices, stacked in buckets:
                for i, d in zip(indices, stacked.split([groups[i].num_rows for i in indices]), strict=True):
                    deltas[i] = d
        pieces = x.split([g.num_rows for g in groups])
        for i, (group, piece) in enumerate(zip(groups, pieces, strict=True)):
            if deltas[i] is not None:
                continue
            d = None if group.adapter == BASE_ROW else delta(group.adapter, piece)
            shape = (*piece.shape[:-1], base_out.shape[-1])
            deltas[i] = base_out.new_zeros(shape) if d is None else d
        return add_delta(base_out, torch.cat(deltas))  # (cat promotes to the widest delta's dtype)
    full = None
    for group in groups:
        if group.adapter == BASE_ROW:
            continue
        d = delta(group.adapter, x[group.rows])
        if d is None:
            continue
        if full is None:
            full = torch.zeros_like(base_out, dtype=torch.promote_types(base_out.dtype, d.dtype))
        full[group.rows] = d
    return base_out if full is None else add_delta(base_out, full)


def add_delta(base_out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """base_out + delta rounded once, to base_out's dtype, as PEFT's LoRA adds its delta (an fp32 delta on a
    bf16 base: summed in fp32; before 2026-12-06 the delta was rounded to bf16 first, 1 ulp off PEFT's)."""
    return (base_out + delta).to(base_out.dtype)


def grouped_mm_exact(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """True where `torch._grouped_mm` serves products with these inner/outer sizes: on CPU, where each segment's
    product and both its gradients are those of `F.linear` on that segment bit for bit (tests/ops/test_experts.py),
    for fp32/bf16 sizes that are multiples of 16 bytes (its kernels' stride rule), and where the installed torch
    has it for CPU. Elsewhere its kernels differ from `F.linear`'s, so a job's numbers would depend on the jobs
    beside it; there equal-size blocks use `stacked_linear` and the rest the per-group path."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.compiler.is_compiling():  # Dynamo has no fake-tensor rule for it on CPU: the loop traces instead
        return False
    return all(d * dtype.itemsize % 16 == 0 for d in dims) and _grouped_mm_runs_on_cpu(dtype)


@functools.cache
def _grouped_mm_runs_on_cpu(dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # probed in a clean state: a first call under no_grad, inference mode, autocast, another default device or
    # activation checkpointing (whose saved-tensor hooks would count the probe's tensors) must not decide it
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        try:
            x = torch.ones(3, 8, dtype=dtype, device="cpu", requires_grad=True)
            weight = torch.ones(2, 8, 8, dtype=dtype, device="cpu", requires_grad=True)
            ends = torch.tensor([1, 3], dtype=torch.int32, device="cpu")
            out = torch._grouped_mm(x, weight.transpose(1, 2), offs=ends)
            (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        except Exception:  # noqa: BLE001 — any failure means: do not use it
            return False
    return bool(out.eq(8).all() and grad.eq(8).all())


def ints_on(values: list, device: torch.device) -> torch.Tensor:
    """Host integers (a list, or a list of equal-length lists) as int32 on `device`; to a GPU from pinned memory
    without blocking, so the copy makes no stream sync (as a `torch.tensor(..., device=)` copy would)."""
    found = torch.tensor(values, dtype=torch.int32)
    if torch.device(device).type == "cuda":
        return found.pin_memory().to(device, non_blocking=True)
    return found.to(device)


def grouped_mm_serves(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """True where one `torch._grouped_mm` can replace a loop of per-segment products whose numbers need not be
    `F.linear`'s bit for bit (a layer's experts, unlike separate jobs): on CPU where `grouped_mm_exact`; on a GPU
    in bf16 (the dtype measured there: 3.6-7x faster than the loop, docs/performance.md) where a first call of each
    form the expert chains use (rows × (E, K, N) weights, a transposed and a plain one, and the per-expert sums of
    products with K split by the offsets), with an empty segment among them, agrees with the loop
    (`_grouped_mm_runs_on`, once per device)."""
    device = torch.device(device)
    if device.type == "cpu":
        return grouped_mm_exact(device, dtype, *dims)
    if device.type == "cuda" and device.index is None:  # one probe per GPU: "cuda" and "cuda:0" are one device
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda" or dtype != torch.bfloat16 or torch.compiler.is_compiling() or not hasattr(
        torch, "_grouped_mm"
    ):
        return False
    return all(d * dtype.itemsize % 16 == 0 for d in dims) and _grouped_mm_runs_on(device, dtype)


@functools.cache
def _grouped_mm_runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
        try:
            generator = torch.Generator().manual_seed(0)
            rows, weight = (torch.randn(shape, generator=generator).to(device, dtype)
                            for shape in ((24, 16), (3, 32, 16)))
            ends = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)  # expert 1 has no rows
            segments = ((0, slice(0, 8)), (2, slice(8, 24)))
            transposed = torch._grouped_mm(rows, weight.transpose(1, 2), offs=ends)  # (24, 32)
            plain = torch._grouped_mm(transposed, weight, offs=ends)  # (24, 16)
            sums = torch._grouped_mm(transposed.t(), rows, offs=ends)  # (3, 32, 16)
            expected = (torch.cat([rows[s] @ weight[e].t() for e, s in segments]),
                        torch.cat([transposed[s] @ weight[e] for e, s in segments]),
                        torch.stack([transposed[0:8].t() @ rows[0:8], torch.zeros_like(weight[1]),
                                     transposed[8:].t() @ rows[8:]]))
            return all(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
                       for got, want in zip((transposed, plain, sums), expected, strict=True))
        except Exception:  # noqa: BLE001 — any failure means: do not use it
            return False


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Row segments of x (N, in) times their own weight (J, out, in): out[seg_j] = F.linear(x[seg_j], W_j); `ends`
    (J,) int32 are the cumulative segment ends. One `torch._grouped_mm` call (see `grouped_mm_exact` for LoRA jobs,
    `grouped_mm_serves` for experts); its backward needs a dense output gradient, so an expanded one (the gradient
    of a sum) is made contiguous."""
    with as_linear_under_autocast(x, weight) as (x, weight):
        out = torch._grouped_mm(x.contiguous(), weight.transpose(1, 2), offs=ends)
    if out.requires_grad:
        out.register_hook(torch.Tensor.contiguous)
    return out


def dropout_setting(dropout: torch.nn.Module) -> tuple:
    """(type, p, training, stream) of an adapter's dropout: equal settings can draw one mask over all their rows (a
    job's own random stream draws only its rows, so a stream is part of the setting). Read from the module's
    `__dict__`, as an absent attribute looked up through `nn.Module.__getattr__` raises and catches an
    AttributeError, which costs more than a short row's rank-r product (`bench/host_time.py`)."""
    attributes = vars(dropout)
    return type(dropout), attributes.get("p", 0), attributes["training"], attributes.get("stream", 0)


def stacked_lora_deltas(
    x: torch.Tensor,
    groups: list[RowGroup],
    factors: Callable[[str], LoraFactors | None],
) -> list[tuple[list[int], torch.Tensor]]:
    """s_j · B_j A_j dropout_j(x_j) for the groups that can share products, as (group indices, their deltas
    concatenated over rows, (Σ rows, ..., out)) per bucket of ≥ 2 groups with the same rank, dtype and device.

    x_j are the consecutive row blocks of x, one per group (`consecutive_slices`). Blocks of equal size run as
    batched products over adapters (`stacked_lora`); blocks of different sizes as grouped products over row
    segments (`grouped_linear`) where `grouped_mm_exact`, else only blocks of equal size are bucketed. Either way
    each adapter's arithmetic is that of its own `F.linear`. A bucket covering all of x whose adapters share one
    dropout setting draws one mask over x, otherwise the (dropped-out) blocks are concatenated. Dropout masks are
    therefore drawn in another order than group by group.
    """
    found = [None if group.adapter == BASE_ROW else factors(group.adapter) for group in groups]
    by_rank: dict[tuple, list[int]] = {}
    for i, f in enumerate(found):
        if f is not None:
            by_rank.setdefault((f.lora_a.shape[0], f.lora_a.dtype, f.lora_a.device), []).append(i)
    buckets = []
    for (rank, dtype, device), indices in by_rank.items():
        out_features = found[indices[0]].lora_b.shape[0]
        if grouped_mm_exact(device, linear_dtype(x.device.type, dtype), x.shape[-1], rank, out_features):
            buckets.append(indices)
            continue
        by_size: dict[int, list[int]] = {}
        for i in indices:
            by_size.setdefault(groups[i].num_rows, []).append(i)
        buckets += by_size.values()
    results, row_tokens, pieces = [], math.prod(x.shape[1:-1]), None
    for indices in buckets:
        if len(indices) < 2:
            continue
        chosen = [found[i] for i in indices]
        dtype = chosen[0].lora_a.dtype
        first = chosen[0].dropout
        setting = dropout_setting(first)
        shared_dropout = all(dropout_setting(f.dropout) == setting for f in chosen)
        if shared_dropout and len(indices) == len(groups):  # one dropout call over all of x
            inputs = first(x.to(dtype)).reshape(-1, x.shape[-1])
        elif len(indices) == len(groups) and indices == sorted(indices):  # every block, each its own dropout
            inputs = dropout_pieces(x.to(dtype), [g.num_rows for g in groups],
                                    [f.dropout for f in chosen]).reshape(-1, x.shape[-1])
        else:
            pieces = x.split([g.num_rows for g in groups]) if pieces is None else pieces
            inputs = torch.cat([f.dropout(pieces[i].to(dtype)).reshape(-1, x.shape[-1])
                                for i, f in zip(indices, chosen, strict=True)])
        tokens = [groups[i].num_rows * row_tokens for i in indices]
        opmath = torch.float64 if dtype == torch.float64 else torch.float32
        scaling = constant_on(tuple(f.scaling for f in chosen), opmath, x.device)
        if len(set(tokens)) == 1:
            out = stacked_lora(inputs.view(len(indices), tokens[0], x.shape[-1]), scaling,  # (sizes: 0 tokens too)
                               [f.lora_a for f in chosen], [f.lora_b for f in chosen]).flatten(0, 1)  # (Σ tokens, out)
        else:
            lora_a, lora_b = torch.stack([f.lora_a for f in chosen]), torch.stack([f.lora_b for f in chosen])
            counts = constant_on(tuple(tokens), torch.int64, x.device)
            ends = counts.cumsum(0).to(torch.int32)
            hidden = grouped_linear(inputs, lora_a, ends)  # (Σ tokens, r)
            out = grouped_linear(scaled(hidden, scaling.repeat_interleave(counts).unsqueeze(1)), lora_b, ends)
        rows = sum(groups[i].num_rows for i in indices)
        results.append((indices, out.view(rows, *x.shape[1:-1], out.shape[-1])))
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
