"""Per-expert products over expert-sorted rows as operators that torch.compile keeps whole.

For rows sorted by expert, with `ends` (E,) the cumulative end of each expert's segment,

    segment_linear(rows, W, ends)[seg_e] = rows[seg_e] W_eᵀ            W: (E, out, in), rows: (M, in)
    ∂L/∂rows[seg_e] = ∂L/∂out[seg_e] W_e,   ∂L/∂W_e = ∂L/∂out[seg_e]ᵀ rows[seg_e]

Eagerly the segment sizes are host integers (`ops.experts.dispatch` reads them once per layer). Under
torch.compile such a read breaks the graph at every MoE layer, and the graph is recompiled for every new pattern
of empty experts; `torch._grouped_mm`, which takes `ends` on the device, has no fake-tensor rule for float32 on the
CPU, so Dynamo cannot trace it either. These operators (`torch.library.custom_op`) take `ends` as a tensor and
give the compiler only their output shapes: the graph stays whole, and inside runs one grouped product where
`segmented_lora.grouped_mm_serves` (CPU fp32/bf16, CUDA bf16), else one product per segment, whose sizes are then
read back inside the operator. Callers pass operands already in F.linear's dtype (`ops.experts._segment_matmul`).
The backward is the two operators below, so a compiled backward has no break either. Checked against per-segment
`F.linear` and its autograd in tests/ops/test_segment_ops.py. Where no grouped product serves, the sizes are read
back on the host, which a CUDA graph cannot capture: both operators are tagged `cudagraph_unsafe`, and Inductor
splits a `mode="reduce-overhead"` graph around them.
"""

from __future__ import annotations

import torch

from peft_mole.ops.segmented_lora import grouped_mm_serves


def _segment_bounds(ends: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, stop) of each non-empty segment."""
    stops = ends.tolist()
    starts = [0, *stops[:-1]]
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(starts, stops, strict=True)) if hi > lo]


@torch.library.custom_op("peft_mole::segment_linear", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def segment_linear(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """out[seg_e] = rows[seg_e] @ weight[e]ᵀ; rows (M, in) sorted by expert, weight (E, out, in), ends (E,) int."""
    if grouped_mm_serves(rows.device, rows.dtype, *weight.shape[1:]) and rows.dtype == weight.dtype:
        return torch._grouped_mm(rows.contiguous(), weight.transpose(1, 2), offs=ends.to(torch.int32))
    out = rows.new_zeros(rows.shape[0], weight.shape[1])
    for e, lo, hi in _segment_bounds(ends):
        torch.mm(rows[lo:hi], weight[e].t(), out=out[lo:hi])
    return out


@segment_linear.register_fake
def _(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[1])


@torch.library.custom_op("peft_mole::segment_weight_grad", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def segment_weight_grad(grad: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor, num_experts: int) -> torch.Tensor:
    """∂L/∂W_e = grad[seg_e]ᵀ rows[seg_e] for every expert, (E, out, in); zero for an expert with no rows."""
    if grouped_mm_serves(grad.device, grad.dtype, grad.shape[1], rows.shape[1]) and grad.dtype == rows.dtype:
        return torch._grouped_mm(grad.t(), rows.contiguous(), offs=ends.to(torch.int32))
    out = grad.new_zeros(num_experts, grad.shape[1], rows.shape[1])
    for e, lo, hi in _segment_bounds(ends):
        torch.mm(grad[lo:hi].t(), rows[lo:hi], out=out[e])
    return out


@segment_weight_grad.register_fake
def _(grad: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor, num_experts: int) -> torch.Tensor:
    return grad.new_empty(num_experts, grad.shape[1], rows.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    rows, weight, ends = inputs
    ctx.save_for_backward(rows, weight, ends)


def _backward(ctx, grad: torch.Tensor):
    rows, weight, ends = ctx.saved_tensors
    grad = grad.contiguous()
    grad_rows = segment_linear(grad, weight.transpose(1, 2), ends) if ctx.needs_input_grad[0] else None
    grad_weight = segment_weight_grad(grad, rows, ends, weight.shape[0]) if ctx.needs_input_grad[1] else None
    return grad_rows, grad_weight, None


segment_linear.register_autograd(_backward, setup_context=_setup_context)
