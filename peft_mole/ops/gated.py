"""The weighted gated activation of an expert pair, w_e · σ(g) ⊙ u, keeping only what its backward needs.

For each (token, expert) pair of a MixLoRA block (MixLoRA §3, SPEC.md §1) the expert's output before the down
projection, weighted by its routing weight, is

    y = w ⊙ σ(g) ⊙ u,   g = W1_e x, u = W3_e x   (shapes (..., I); w broadcast over I)

Plain autograd keeps four tensors of that size for the backward (g for σ', σ(g) and u for the first product,
σ(g) ⊙ u for the second). This function keeps g and u only and recomputes σ(g) in the backward:

    ∂L/∂u = ∂L/∂y ⊙ w σ(g),   ∂L/∂g = ∂L/∂y ⊙ w u σ'(g),   ∂L/∂w = Σ_I ∂L/∂y ⊙ σ(g) ⊙ u

so a pair costs two (..., I) tensors of saved activations instead of four (for DynMoLE's broadcast tokens that
is E of them per token). σ is any activation module or function, in place or not (its derivative comes from
autograd on the recomputed σ(g), under the forward's autocast state); checked against plain autograd by
torch.autograd.gradcheck in tests/ops/test_gated.py. First derivatives only (no `create_graph=True`).

Forward and backward run over blocks of `CHUNK_ELEMENTS` values on the CPU (whole rows of I; larger blocks on a
GPU: `block_elements`), so the chain's temporaries (σ(g), the products) stay in cache and only g, u, ∂L/∂y and the
results travel to and from memory: about 5 passes over the (..., I) tensors instead of about 20. The forward equals the one-block result exactly, the
gradients to rounding (tests/ops/test_gated.py). Inputs with no (rows, I) view (expanded) run as one block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 18  # values per block (1 MiB in fp32). Measured fwd + bwd on 2 CPU threads: DynMoLE's
# (8, 1024, 1376) 122 ms in one block, 68-74 ms in blocks of 2^17-2^19 values; MixLoRA's (2048, 1376) 12 -> 9-11 ms
ACCELERATOR_BLOCK_ELEMENTS = 1 << 24  # values per block off the CPU (64 MiB in fp32); see `block_elements`


def block_elements(device: torch.device, cpu_elements: int) -> int:
    """Values per block of a blockwise expert chain on `device`: `cpu_elements` on the CPU, where a block's
    temporaries then stay in cache; at least `ACCELERATOR_BLOCK_ELEMENTS` on a GPU, where each block costs a dozen
    or more kernel launches and there is no such cache to fit. With CPU-sized blocks the medium shape (I = 5632,
    8192 pairs a layer) made about 180 blocks per layer, and an H200 spent seconds per MixLoRA step launching
    them (docs/gpu.md); blocks of 2^24 values make 3, each of whose kernels streams tens of MB.
    """
    return cpu_elements if device.type == "cpu" else max(cpu_elements, ACCELERATOR_BLOCK_ELEMENTS)


def works_in_place(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether act_fn overwrites its input: an `inplace` attribute (nn.SiLU(inplace=True)) or keyword
    (functools.partial(F.silu, inplace=True))."""
    return bool(getattr(act_fn, "inplace", False) or (getattr(act_fn, "keywords", None) or {}).get("inplace"))


def is_plain_silu(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether act_fn is SiLU by contract, so its derivative kernel can be called: F.silu, nn.SiLU itself, or
    transformers' SiLUActivation (the `silu` of Llama, Qwen2 and Mistral since transformers 5; its forward is
    F.silu, or a kernel of the Hub's "SiLU" layer). Subclasses are not: they may compute something else."""
    if act_fn is F.silu or type(act_fn) is nn.SiLU:
        return True
    kind = type(act_fn)
    return kind.__name__ == "SiLUActivation" and kind.__module__ == "transformers.activations"


def activate_apart(act_fn: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    """act_fn(gate) in a tensor of its own: never gate itself, a view of it, or gate overwritten in place."""
    out = act_fn(gate.clone() if works_in_place(act_fn) else gate)
    return out.clone() if out.untyped_storage().data_ptr() == gate.untyped_storage().data_ptr() else out


def _rows(tensor: torch.Tensor) -> torch.Tensor | None:
    """`tensor` as a (rows, I) view, or None when its strides allow none (an expanded view) or it has no rows."""
    if tensor.numel() == 0:
        return None
    try:
        return tensor.view(-1, tensor.shape[-1])
    except RuntimeError:
        return None


def _blocks(num_rows: int, width: int, device: torch.device) -> list[slice]:
    rows = max(1, block_elements(device, CHUNK_ELEMENTS) // max(width, 1))
    return [slice(start, start + rows) for start in range(0, num_rows, rows)]


def _gradients(ctx, gate, up, weight, grad, out_gate=None, out_up=None, out_weight=None):
    """(∂L/∂g, ∂L/∂u, ∂L/∂w) on one block, None for what is not needed; each into its `out_*` tensor when given.

    With `out_weight` (rows, 1) ∂L/∂w is summed over I; without it, it is ∂L/∂y ⊙ σ(g) ⊙ u, to be summed.
    σ' comes from autograd on the recomputed σ(g); for SiLU (`is_plain_silu`) from its derivative kernel directly
    (the same one autograd calls), which writes into `out_gate`.
    """
    device, autocast_on, autocast_dtype = ctx.autocast
    silu = out_gate is not None and is_plain_silu(ctx.act_fn)
    with torch.set_grad_enabled(not silu), torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on):
        leaf = gate if silu else gate.detach().requires_grad_()
        activated = ctx.act_fn(leaf.clone() if works_in_place(ctx.act_fn) else leaf)
    grad_gate = grad_up = grad_weight = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_activated = grad * activated.detach()  # ∂L/∂y ⊙ σ(g)
        if ctx.needs_input_grad[2]:
            grad_weight = grad_activated * up
            if out_weight is not None:
                grad_weight = torch.sum(grad_weight, dim=-1, keepdim=True, out=out_weight)
        if ctx.needs_input_grad[1]:
            grad_up = grad_activated.mul_(weight) if out_up is None else torch.mul(grad_activated, weight, out=out_up)
    if ctx.needs_input_grad[0]:
        grad_pre = (grad * weight).mul_(up)  # ∂L/∂σ(g)
        if silu:
            grad_gate = torch.ops.aten.silu_backward(grad_pre, gate, grad_input=out_gate)
        else:
            (grad_gate,) = torch.autograd.grad(activated, leaf, grad_pre)
            if out_gate is not None:
                grad_gate = out_gate.copy_(grad_gate)
    return grad_gate, grad_up, grad_weight


class _WeightedGatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, act_fn):
        device = gate.device.type
        ctx.act_fn = act_fn
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(gate, up, weight)
        gate_rows, up_rows = _rows(gate), _rows(up)
        if gate_rows is None or up_rows is None:
            return activate_apart(act_fn, gate).mul_(up).mul_(weight)
        weight_rows = weight.expand(*gate.shape[:-1], 1).reshape(-1, 1)
        out = None
        for block in _blocks(gate_rows.shape[0], gate.shape[-1], gate.device):
            activated = activate_apart(act_fn, gate_rows[block])
            if out is None:
                out = activated.new_empty(gate_rows.shape)
            torch.mul(activated, up_rows[block], out=out[block]).mul_(weight_rows[block])
        return out.view(gate.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        gate_rows, up_rows, grad_rows = _rows(gate), _rows(up), _rows(grad)
        if gate_rows is None or up_rows is None or grad_rows is None:  # expanded views: one block
            grad_gate, grad_up, grad_weight = _gradients(ctx, gate, up, weight, grad)
            return grad_gate, grad_up, None if grad_weight is None else grad_weight.sum_to_size(weight.shape), None
        weight_rows = weight.expand(*gate.shape[:-1], 1).reshape(-1, 1)
        grad_up = up_rows.new_empty(up_rows.shape) if ctx.needs_input_grad[1] else None
        grad_weight = weight_rows.new_empty(weight_rows.shape) if ctx.needs_input_grad[2] else None
        grad_gate = gate_rows.new_empty(gate_rows.shape) if ctx.needs_input_grad[0] else None
        for block in _blocks(gate_rows.shape[0], gate.shape[-1], gate.device):
            _gradients(ctx, gate_rows[block], up_rows[block], weight_rows[block], grad_rows[block],
                       *(None if out is None else out[block] for out in (grad_gate, grad_up, grad_weight)))
        return (
            None if grad_gate is None else grad_gate.view(gate.shape),
            None if grad_up is None else grad_up.view(up.shape),
            None if grad_weight is None else grad_weight.view(*gate.shape[:-1], 1).sum_to_size(weight.shape),
            None,
        )


def weighted_gated_activation(
    gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """w ⊙ act_fn(gate) ⊙ up, saving gate and up (not the activation) for the backward.

    Args:
        gate: (..., I), the frozen-plus-LoRA gate projection of each pair.
        up: (..., I), the up projection, same shape and dtype.
        weight: broadcastable to them with size 1 in the last dimension, e.g. (M, 1) per pair or (E, N, 1) per
            expert and token.
        act_fn: the MLP's activation.
    """
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    try:
        fits = torch.broadcast_shapes(weight.shape, gate.shape) == gate.shape and weight.shape[-1:] in ((1,), ())
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} must broadcast to the gate's {tuple(gate.shape)} with size 1 "
            "in the last dimension"
        )
    weight = weight.to(gate.dtype)
    if torch.compiler.is_compiling():  # the compiler fuses the chain and picks what its backward keeps
        return act_fn(gate.clone() if works_in_place(act_fn) else gate) * up * weight
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad or weight.requires_grad):
        return activate_apart(act_fn, gate) * up * weight
    return _WeightedGatedActivation.apply(gate, up, weight, act_fn)
