"""Every expert on every token, from the gate/up pairs to the down projection's LoRA input, in cache-sized blocks.

When a router sends (almost) every token to every expert (DynMoLE broadcasting, DynMoLE §3.2) the MixLoRA block
(MixLoRA §3, SPEC.md §1) computes, for E experts and N tokens, expert-major:

    h_e = σ(g_e) ⊙ u_e,   hidden = Σ_e w_e h_e  (N, I),   z_e = A2_e (m ⊙ w_e h_e)  (E, N, r)

with m the down projection's dropout mask (one per token, shared by its experts; all ones without dropout). The
frozen W2 then runs once on `hidden`, and the experts' B2 on z (`dense_lora_sum`).

Step by step, each of these products is a pass over an (E, N, I) tensor in memory (45 MB per layer for the small
shape), about ten of them over forward and backward. This function runs the chain over blocks of tokens that fit
in cache, so only g and u (saved for the backward, as `ops.gated` does) and their gradients travel to memory, and
it keeps nothing else of that size: w_e h_e and m ⊙ w_e h_e are recomputed per block in the backward.

Backward, with δ = ∂L/∂hidden + m ⊙ (∂L/∂z_e A2_e) per expert and token:

    ∂L/∂w_e = Σ_I δ ⊙ h_e,  ∂L/∂u_e = w_e δ ⊙ σ(g_e),  ∂L/∂g_e = w_e δ ⊙ u_e ⊙ σ'(g_e),  ∂L/∂A2_e = Σ_t ∂L/∂z_eᵀ (m ⊙ w_e h_e)

Checked against plain autograd (gradcheck) in tests/ops/test_dense_mixture.py. First derivatives only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from peft_mole.ops.experts import expert_compute_dtype, in_adapter_precision_on_cpu
from peft_mole.ops.gated import _activate

BLOCK_ELEMENTS = 1 << 19  # values of one (E, tokens, I) block (2 MiB in fp32; with its temporaries it stays in L3)


def _token_blocks(num_experts: int, num_tokens: int, width: int) -> list[slice]:
    tokens = max(1, BLOCK_ELEMENTS // max(num_experts * width, 1))
    return [slice(start, start + tokens) for start in range(0, num_tokens, tokens)]


class _DenseGatedMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, down_a, mask, act_fn, compute_dtype):
        ctx.act_fn = act_fn
        ctx.compute_dtype = compute_dtype
        device = gate.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(gate, up, weight, down_a, mask)
        num_experts, num_tokens, width = gate.shape
        a_t = down_a.to(compute_dtype).transpose(1, 2)  # (E, I, r)
        hidden = z = None
        for block in _token_blocks(num_experts, num_tokens, width):
            weighted = _activate(act_fn, gate[:, block]).mul_(up[:, block]).mul_(weight[:, block])
            if hidden is None:
                hidden = weighted.new_empty(num_tokens, width)
                z = torch.empty(num_experts, num_tokens, down_a.shape[1], dtype=compute_dtype, device=gate.device)
            torch.sum(weighted, dim=0, out=hidden[block])
            if mask is not None:
                weighted.mul_(mask[block])
            with torch.autocast(device, enabled=False):
                z[:, block] = torch.bmm(weighted.to(compute_dtype), a_t)
        return hidden, z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hidden, grad_z):
        gate, up, weight, down_a, mask = ctx.saved_tensors
        device, autocast_on, autocast_dtype = ctx.autocast
        needs_gate, needs_up, needs_weight, needs_a = ctx.needs_input_grad[:4]
        num_experts, num_tokens, width = gate.shape
        silu = isinstance(ctx.act_fn, nn.SiLU)
        a_cd = down_a.to(ctx.compute_dtype)
        grad_gate = torch.empty_like(gate) if needs_gate else None
        grad_up = torch.empty_like(up) if needs_up else None
        grad_weight = gate.new_empty(num_experts, num_tokens, 1) if needs_weight else None
        grad_a = torch.zeros_like(down_a) if needs_a else None
        for block in _token_blocks(num_experts, num_tokens, width):
            g, u, w = gate[:, block], up[:, block], weight[:, block]
            with torch.set_grad_enabled(not silu), torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on):
                leaf = g if silu else g.detach().requires_grad_()
                activated = ctx.act_fn(leaf.clone() if getattr(ctx.act_fn, "inplace", False) else leaf)
            h = activated.detach() * u  # h_e (E, n, I)
            gz = grad_z[:, block].to(ctx.compute_dtype)  # (E, n, r)
            with torch.autocast(device, enabled=False):
                if needs_a:
                    down_input = h * w if mask is None else (h * w).mul_(mask[block])
                    grad_a += torch.bmm(gz.transpose(1, 2), down_input.to(ctx.compute_dtype)).to(grad_a.dtype)
                delta = torch.bmm(gz, a_cd).to(h.dtype)  # ∂L/∂z_e A2_e (E, n, I)
            if mask is not None:
                delta.mul_(mask[block])
            delta.add_(grad_hidden[block])  # δ
            if needs_weight:
                torch.sum(delta * h, dim=-1, keepdim=True, out=grad_weight[:, block])
            delta.mul_(w)  # w_e δ = ∂L/∂h_e
            if needs_up:
                torch.mul(delta, activated.detach(), out=grad_up[:, block])
            if needs_gate:
                delta.mul_(u)  # ∂L/∂σ(g_e)
                if silu:
                    torch.ops.aten.silu_backward(delta, g, grad_input=grad_gate[:, block])
                else:
                    (grad_gate[:, block],) = torch.autograd.grad(activated, leaf, delta)
        if grad_weight is not None:
            grad_weight = grad_weight.sum_to_size(weight.shape)
        return grad_gate, grad_up, grad_weight, grad_a, None, None, None


@in_adapter_precision_on_cpu
def dense_gated_mixture(
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    down_a: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_e w_e σ(g_e) ⊙ u_e, A2_e (m ⊙ w_e σ(g_e) ⊙ u_e) per expert), computed blockwise (see the module).

    Args:
        gate, up: (E, N, I) per expert and token, g_e and u_e.
        weight: (E, N, 1) routing weights w_e (0 for an unselected pair).
        act_fn: the MLP's activation σ.
        down_a: (E, r, I) the down experts' A2_e.
        mask: (N, I) the down projection's dropout mask m (already scaled by 1 / (1 − p)), or None.
    Returns:
        hidden (N, I) in the dtype of σ(g), and z (E, N, r) in the dtype of the A2 products: down_a's, or
        autocast's where it is on (not on CPU, as for the other expert products: `ops.experts`).
    """
    if gate.dim() != 3 or up.shape != gate.shape:
        raise ValueError(f"gate and up must both be (E, N, I), got {tuple(gate.shape)} and {tuple(up.shape)}")
    num_experts, num_tokens, width = gate.shape
    if weight.shape != (num_experts, num_tokens, 1):
        raise ValueError(f"weight must be (E, N, 1) = {(num_experts, num_tokens, 1)}, got {tuple(weight.shape)}")
    if down_a.dim() != 3 or down_a.shape[0] != num_experts or down_a.shape[2] != width:
        raise ValueError(f"down_a must be (E, r, I) with E={num_experts}, I={width}, got {tuple(down_a.shape)}")
    if mask is not None and mask.shape != (num_tokens, width):
        raise ValueError(f"mask must be (N, I) = {(num_tokens, width)}, got {tuple(mask.shape)}")
    compute_dtype = expert_compute_dtype(gate.device.type, down_a.dtype)
    return _DenseGatedMixture.apply(gate, up, weight.to(gate.dtype), down_a, mask, act_fn, compute_dtype)
