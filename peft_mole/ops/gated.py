"""The weighted gated activation of an expert pair, w_e · σ(g) ⊙ u, keeping only what its backward needs.

For each (token, expert) pair of a MixLoRA block (MixLoRA §3, SPEC.md §1) the expert's output before the down
projection, weighted by its routing weight, is

    y = w ⊙ σ(g) ⊙ u,   g = W1_e x, u = W3_e x   (shapes (..., I); w broadcast over I)

Plain autograd keeps four tensors of that size for the backward (g for σ', σ(g) and u for the first product,
σ(g) ⊙ u for the second). This function keeps g and u only and recomputes σ(g) in the backward:

    ∂y/∂u = w σ(g),   ∂y/∂g = w u σ'(g),   ∂y/∂w = Σ_I σ(g) ⊙ u

so a pair costs two (..., I) tensors of saved activations instead of four (for DynMoLE's broadcast tokens that
is E of them per token). σ is any activation module or function (its derivative comes from autograd on the
recomputed σ(g)); checked against plain autograd by torch.autograd.gradcheck in tests/ops/test_gated.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable


class _WeightedGatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, act_fn):
        ctx.act_fn = act_fn
        ctx.save_for_backward(gate, up, weight)
        out = act_fn(gate)
        return out.mul_(up).mul_(weight) if out is not gate else out * up * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_()
            activated = ctx.act_fn(leaf)
        grad_weight = grad_up = grad_gate = None
        if ctx.needs_input_grad[2]:
            grad_weight = _sum_to(grad * activated.detach() * up, weight.shape)
        scaled = grad * weight  # w ⊙ ∂L/∂y
        if ctx.needs_input_grad[1]:
            grad_up = scaled * activated.detach()
        if ctx.needs_input_grad[0]:
            (grad_gate,) = torch.autograd.grad(activated, leaf, scaled.mul_(up))
        return grad_gate, grad_up, grad_weight, None


def _sum_to(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast result back to an operand's shape (the routing weight's (..., 1))."""
    dims = [i for i, (t, s) in enumerate(zip(tensor.shape, shape, strict=True)) if s == 1 and t != 1]
    return tensor.sum(dim=dims, keepdim=True) if dims else tensor


def weighted_gated_activation(
    gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """w ⊙ act_fn(gate) ⊙ up, saving gate and up (not the activation) for the backward.

    Args:
        gate, up: (..., I) of one dtype; weight: broadcastable to them with size 1 in the last dimension, e.g.
            (M, 1) per pair or (E, N, 1) per expert and token; act_fn: the MLP's activation.
    """
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    weight = weight.to(gate.dtype)
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad or weight.requires_grad):
        return act_fn(gate) * up * weight
    return _WeightedGatedActivation.apply(gate, up, weight, act_fn)
