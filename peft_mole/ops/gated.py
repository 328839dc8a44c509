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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable


def _activate(act_fn: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    """act_fn(gate) in a tensor of its own: never gate itself, a view of it, or gate overwritten in place."""
    out = act_fn(gate.clone() if getattr(act_fn, "inplace", False) else gate)
    return out.clone() if out.untyped_storage().data_ptr() == gate.untyped_storage().data_ptr() else out


class _WeightedGatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, act_fn):
        device = gate.device.type
        ctx.act_fn = act_fn
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(gate, up, weight)
        return _activate(act_fn, gate).mul_(up).mul_(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        device, autocast_on, autocast_dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on):
            leaf = gate.detach().requires_grad_()
            activated = ctx.act_fn(leaf.clone() if getattr(ctx.act_fn, "inplace", False) else leaf)
        grad_weight = grad_up = grad_gate = None
        if ctx.needs_input_grad[2]:
            grad_weight = (grad * activated.detach() * up).sum_to_size(weight.shape)
        scaled = grad * weight  # w ⊙ ∂L/∂y
        if ctx.needs_input_grad[1]:
            grad_up = scaled * activated.detach()
        if ctx.needs_input_grad[0]:
            (grad_gate,) = torch.autograd.grad(activated, leaf, scaled.mul_(up))
        return grad_gate, grad_up, grad_weight, None


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
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad or weight.requires_grad):
        return _activate(act_fn, gate) * up * weight
    return _WeightedGatedActivation.apply(gate, up, weight, act_fn)
