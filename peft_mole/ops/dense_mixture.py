"""Every expert on every token, from the frozen gate/up outputs to the down projection's LoRA input, in blocks.

When a router sends (almost) every token to every expert (DynMoLE broadcasting, DynMoLE §3.2) the MixLoRA block
(MixLoRA §3, SPEC.md §1) computes, for E experts and N tokens, expert-major:

    g_e = W1 x + s·B1_e z1_e,  u_e = W3 x + s·B3_e z3_e   (z_e = A_e dropout(x), (E, N, r))
    h_e = σ(g_e) ⊙ u_e,   hidden = Σ_e w_e h_e  (N, I),   z2_e = A2_e (m ⊙ w_e h_e)  (E, N, r)

with m the down projection's dropout mask (one per token, shared by its experts; all ones without dropout). The
frozen W2 then runs once on `hidden`, and the experts' B2 on z2 (`ops.experts.dense_b_sum`).

Done step by step, each of these is a pass over an (E, N, I) tensor in memory (45 MB per layer for the small
shape), about twenty of them over forward and backward, and autograd keeps three of them per layer. This function
runs the chain over blocks of tokens that fit in cache and keeps nothing of size (E, N, I): g_e, u_e and h_e are
recomputed per block in the backward from W1 x, W3 x (N, I) and the rank-r z (recomputing B z costs 2·E·r·I
multiply-adds per token, less than reading g_e back from memory on a CPU).

Backward, per expert and token, with δ = ∂L/∂hidden + m ⊙ (∂L/∂z2_e A2_e):

    ∂L/∂w_e = Σ_I δ ⊙ h_e,   ∂L/∂u_e = w_e δ ⊙ σ(g_e),   ∂L/∂g_e = w_e δ ⊙ u_e ⊙ σ'(g_e),
    ∂L/∂A2_e = Σ_t ∂L/∂z2_eᵀ (m ⊙ w_e h_e),   ∂L/∂(W1 x) = Σ_e ∂L/∂g_e,
    ∂L/∂z1_e = s ∂L/∂g_e B1_e,   ∂L/∂B1_e = s Σ_t ∂L/∂g_eᵀ z1_e   (the same for u with B3, z3)

Checked against plain autograd (gradcheck) in tests/ops/test_dense_mixture.py. First derivatives only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from peft_mole.ops.experts import expert_compute_dtype, in_adapter_precision_on_cpu
from peft_mole.ops.fused_chain import fused_backward_block, fused_chain_enabled, fused_forward_block
from peft_mole.ops.gated import activate_apart, block_elements, is_plain_silu, works_in_place

BLOCK_ELEMENTS = 1 << 19  # values of one (E, tokens, I) block on the CPU: 2 MiB in fp32, so the block's few
# temporaries stay in cache (on a GPU: `gated.block_elements`). Measured fwd + bwd of the chain on (8, 1024, 1376): 2^17 86 ms, 2^18 75, 2^19 72, 2^20 80, 2^21 104.


def gradient_sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where gradients are summed over blocks: fp32 for 16-bit parameters (bf16 sums lose bits block by block)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _token_blocks(num_experts: int, num_tokens: int, width: int, device: torch.device) -> list[slice]:
    tokens = max(1, block_elements(device, BLOCK_ELEMENTS) // max(num_experts * width, 1))
    return [slice(start, start + tokens) for start in range(0, num_tokens, tokens)]


def _fused_block_indices(act_fn, frozen: tuple, adapter: tuple, blocks: list[slice], num_tokens: int) -> set[int]:
    """Indices of the blocks that run the compiled kernels of `ops.fused_chain`: the full blocks (never the last,
    shorter one) when the switch is on, σ is SiLU, gate and up both have experts and every rank is above 0 (no
    None or empty tensor among `adapter`), and the `frozen` tensors (gate, up, w, mask, ∂L/∂hidden) share a dtype.
    The adapter tensors may have another: the kernels compute the products in it, as the eager chain does."""
    if (not fused_chain_enabled() or not is_plain_silu(act_fn) or any(t is None or t.numel() == 0 for t in adapter)
            or len({t.dtype for t in frozen if t is not None}) != 1):
        return set()
    tokens = blocks[0].stop - blocks[0].start
    return {i for i, block in enumerate(blocks) if block.stop <= num_tokens and block.stop - block.start == tokens}


def _expert_outputs(frozen, z, lora_b, block, num_experts, scaling, compute_dtype):
    """frozen + s·B_e z_e on one block of tokens, (E, n, I); the frozen output broadcast where there is no LoRA."""
    if z is None:
        return frozen[block].unsqueeze(0).expand(num_experts, -1, -1)
    out = torch.baddbmm(frozen[block].to(compute_dtype).unsqueeze(0), z[:, block].to(compute_dtype),
                        lora_b.to(compute_dtype).transpose(1, 2), alpha=scaling)
    return out.to(frozen.dtype)


def chain_block_backward(ctx, g, u, w, mask, delta_z, grad_hidden, want_weight: bool, want_down_input: bool):
    """The backward of one block, shared with `ops.pair_mixture`: (∂L/∂g, ∂L/∂u, ∂L/∂w or None, the down experts'
    input m ⊙ w h or None), with δ = ∂L/∂hidden + m ⊙ (∂L/∂z2 A2) as in the module docstring. The caller gives
    `delta_z` = ∂L/∂z2 A2 in the products' dtype (δ is formed in h's dtype, in place where they agree) and forms
    ∂L/∂A2 = ∂L/∂z2ᵀ (m ⊙ w h) from the input returned, expert by expert: a block of pairs may span several experts.

    Shapes: g, u, delta_z (..., n, I); w (..., n, 1); mask, grad_hidden (n, I) (broadcast over experts). `ctx`
    carries act_fn and the forward's autocast state. σ' comes from autograd on the recomputed σ(g); for SiLU
    (`gated.is_plain_silu`) from its derivative kernel directly (the one autograd calls).
    """
    device, autocast_on, autocast_dtype = ctx.autocast
    act_fn = ctx.act_fn
    silu = is_plain_silu(act_fn)
    with torch.set_grad_enabled(not silu), torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on):
        leaf = g if silu else g.detach().requires_grad_()
        activated = act_fn(leaf.clone() if works_in_place(act_fn) else leaf)
    h = activated.detach() * u  # h (..., n, I)
    delta = delta_z.to(h.dtype)
    down_input = None
    if want_down_input:
        down_input = (h * w).mul_(mask) if mask is not None else h * w
    if mask is not None:
        delta.mul_(mask)
    delta.add_(grad_hidden)  # δ
    grad_w = (delta * h).sum(-1, keepdim=True) if want_weight else None
    delta.mul_(w)  # ∂L/∂h
    grad_u = delta * activated.detach()
    delta.mul_(u)  # ∂L/∂σ(g)
    grad_g = torch.ops.aten.silu_backward(delta, g) if silu else torch.autograd.grad(activated, leaf, delta)[0]
    return grad_g, grad_u, grad_w, down_input


class _DenseGatedMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, z_gate, b_gate, z_up, b_up, weight, down_a, mask, act_fn, scaling, compute_dtype):
        device = gate.device.type
        ctx.act_fn, ctx.scaling, ctx.compute_dtype = act_fn, scaling, compute_dtype
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(gate, up, z_gate, b_gate, z_up, b_up, weight, down_a, mask)
        num_experts, num_tokens, width = weight.shape[0], gate.shape[0], gate.shape[1]
        a_t = down_a.to(compute_dtype).transpose(1, 2)  # (E, I, r)
        hidden = gate.new_empty(num_tokens, width)
        z_down = a_t.new_empty(num_experts, num_tokens, a_t.shape[2])
        blocks = _token_blocks(num_experts, num_tokens, width, gate.device)
        fused = _fused_block_indices(act_fn, (gate, up, weight, mask), (z_gate, b_gate, z_up, b_up, down_a), blocks,
                                     num_tokens)
        scaled = (b_gate * scaling, b_up * scaling) if fused else None
        with torch.autocast(device, enabled=False):
            for index, block in enumerate(blocks):
                out = None if index not in fused else fused_forward_block(
                    gate[block], up[block], weight[:, block], None if mask is None else mask[block],
                    z_gate[:, block].to(compute_dtype), scaled[0], z_up[:, block], scaled[1], down_a)
                if out is not None:
                    hidden[block], z_down[:, block] = out
                    continue
                g = _expert_outputs(gate, z_gate, b_gate, block, num_experts, scaling, compute_dtype)
                u = _expert_outputs(up, z_up, b_up, block, num_experts, scaling, compute_dtype)
                with torch.autocast(device, dtype=ctx.autocast[2], enabled=ctx.autocast[1]):
                    activated = activate_apart(act_fn, g)
                weighted = activated.mul_(u).mul_(weight[:, block])  # w_e h_e (E, n, I)
                hidden[block] = weighted.sum(0)
                if mask is not None:
                    weighted.mul_(mask[block])
                z_down[:, block] = torch.bmm(weighted.to(compute_dtype), a_t)
        return hidden, z_down

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hidden, grad_z_down):
        gate, up, z_gate, b_gate, z_up, b_up, weight, down_a, mask = ctx.saved_tensors
        device = ctx.autocast[0]
        names = ("gate", "up", "z_gate", "b_gate", "z_up", "b_up", "weight", "down_a")
        inputs = dict(zip(names, (gate, up, z_gate, b_gate, z_up, b_up, weight, down_a), strict=True))
        needs = dict(zip(names, ctx.needs_input_grad[:8], strict=True))
        grads = {name: None for name in names}
        for name in ("gate", "up", "z_gate", "z_up"):
            if needs[name]:
                grads[name] = torch.empty_like(inputs[name])
        for name in ("b_gate", "b_up", "down_a"):  # summed over blocks, in fp32 at least
            if needs[name]:
                grads[name] = torch.zeros_like(inputs[name], dtype=gradient_sum_dtype(inputs[name].dtype))
        num_experts, num_tokens, width = weight.shape[0], gate.shape[0], gate.shape[1]
        if needs["weight"]:
            grads["weight"] = gate.new_empty(num_experts, num_tokens, 1)
        cd, scaling = ctx.compute_dtype, ctx.scaling
        a_cd = down_a.to(cd)
        blocks = _token_blocks(num_experts, num_tokens, width, gate.device)
        fused = _fused_block_indices(ctx.act_fn, (gate, up, weight, mask, grad_hidden),
                                     (z_gate, b_gate, z_up, b_up, down_a), blocks, num_tokens)
        scaled = (b_gate * scaling, b_up * scaling) if fused else None
        with torch.autocast(device, enabled=False):
            for index, block in enumerate(blocks):
                out = None if index not in fused else fused_backward_block(
                    gate[block], up[block], weight[:, block], None if mask is None else mask[block],
                    grad_hidden[block], z_gate[:, block].to(cd), scaled[0], z_up[:, block], scaled[1],
                    grad_z_down[:, block], down_a)
                if out is not None:
                    _add_fused_gradients(grads, out, block, scaling)
                    continue
                g = _expert_outputs(gate, z_gate, b_gate, block, num_experts, scaling, cd)
                u = _expert_outputs(up, z_up, b_up, block, num_experts, scaling, cd)
                w = weight[:, block]
                m = None if mask is None else mask[block]
                grad_z = grad_z_down[:, block].to(cd)
                grad_g, grad_u, grad_w, down_input = chain_block_backward(
                    ctx, g, u, w, m, grad_z @ a_cd, grad_hidden[block], needs["weight"], needs["down_a"]
                )
                if grad_w is not None:
                    grads["weight"][:, block] = grad_w
                if down_input is not None:  # ∂L/∂A2_e = ∂L/∂z2_eᵀ (m ⊙ w_e h_e)
                    grads["down_a"] += (grad_z.transpose(1, 2) @ down_input.to(cd)).to(grads["down_a"].dtype)
                for frozen, z, b, grad_pair in (("gate", "z_gate", "b_gate", grad_g), ("up", "z_up", "b_up", grad_u)):
                    _to_inputs(grads, needs, inputs, frozen, z, b, grad_pair, block, scaling, cd)
        if grads["weight"] is not None:
            grads["weight"] = grads["weight"].sum_to_size(weight.shape)
        for name in ("b_gate", "b_up", "down_a"):
            if grads[name] is not None:
                grads[name] = grads[name].to(inputs[name].dtype)
        return (*grads.values(), None, None, None, None)


def _add_fused_gradients(grads: dict, out: tuple, block: slice, scaling: float) -> None:
    """Put one block's gradients from `ops.fused_chain.fused_backward_block` where the eager chain puts them. The
    kernel's B gradients are with respect to s·B, hence times s; its z gradients already carry s (from s·B)."""
    grad_gate, grad_up, grad_weight, grad_z_gate, grad_b_gate, grad_z_up, grad_b_up, grad_down_a = out
    for name, value in (("gate", grad_gate), ("up", grad_up)):
        if grads[name] is not None:
            grads[name][block] = value
    for name, value in (("z_gate", grad_z_gate), ("z_up", grad_z_up)):
        if grads[name] is not None:
            grads[name][:, block] = value
    for name, value in (("b_gate", grad_b_gate), ("b_up", grad_b_up)):
        if grads[name] is not None:
            grads[name] += value.mul_(scaling).to(grads[name].dtype)
    if grads["weight"] is not None:
        grads["weight"][:, block] = grad_weight
    if grads["down_a"] is not None:
        grads["down_a"] += grad_down_a.to(grads["down_a"].dtype)


def _to_inputs(grads, needs, inputs, frozen, z, b, grad_pair, block, scaling, compute_dtype):
    """∂L/∂(frozen output) = Σ_e ∂L/∂pair_e; ∂L/∂z_e = s ∂L/∂pair_e B_e; ∂L/∂B_e += s ∂L/∂pair_eᵀ z_e (one block)."""
    if needs[frozen]:
        grads[frozen][block] = grad_pair.sum(0)
    if inputs[z] is None:
        return
    grad_cd = grad_pair.to(compute_dtype)
    if needs[z]:
        grads[z][:, block] = torch.bmm(grad_cd, inputs[b].to(compute_dtype)).mul_(scaling)
    if needs[b]:
        z_block = inputs[z][:, block].to(compute_dtype)
        grads[b] += torch.bmm(grad_cd.transpose(1, 2), z_block).mul_(scaling).to(grads[b].dtype)


@in_adapter_precision_on_cpu
def dense_gated_mixture(
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    down_a: torch.Tensor,
    mask: torch.Tensor | None = None,
    gate_lora: tuple[torch.Tensor, torch.Tensor] | None = None,
    up_lora: tuple[torch.Tensor, torch.Tensor] | None = None,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_e w_e σ(g_e) ⊙ u_e, A2_e (m ⊙ w_e σ(g_e) ⊙ u_e) per expert), computed blockwise (see the module).

    Args:
        gate: (N, I) the frozen W1 x, shared by the experts.
        up: (N, I) the frozen W3 x.
        weight: (E, N, 1) routing weights w_e (0 for an unselected pair).
        act_fn: the MLP's activation σ.
        down_a: (E, r, I) the down experts' A2_e; (E, 0, I) in the adapter's dtype for a block without down
            experts (then z2 is (E, N, 0)).
        mask: (N, I) the down projection's dropout mask m (already scaled by 1 / (1 − p)), or None.
        gate_lora: (z, B) with z (E, N, r) = A1_e dropout(x) and B (E, I, r), or None for a gate without
            experts (then g_e = W1 x for every expert).
        up_lora: the same for the up projection.
        scaling: s of the gate/up experts.
    Returns:
        hidden (N, I) in the frozen outputs' dtype, and z2 (E, N, r) in the dtype of the expert products: the
        adapter's, or autocast's where it is on (not on CPU, as for the other expert products: `ops.experts`).
    """
    if gate.dim() != 2 or up.shape != gate.shape:
        raise ValueError(f"gate and up must both be (N, I), got {tuple(gate.shape)} and {tuple(up.shape)}")
    num_tokens, width = gate.shape
    if weight.dim() != 3 or weight.shape[1:] != (num_tokens, 1):
        raise ValueError(f"weight must be (E, N, 1) with N={num_tokens}, got {tuple(weight.shape)}")
    num_experts = weight.shape[0]
    if down_a.dim() != 3 or down_a.shape[0] != num_experts or down_a.shape[2] != width:
        raise ValueError(f"down_a must be (E, r, I) with E={num_experts}, I={width}, got {tuple(down_a.shape)}")
    if mask is not None and mask.shape != (num_tokens, width):
        raise ValueError(f"mask must be (N, I) = {(num_tokens, width)}, got {tuple(mask.shape)}")
    for name, lora in (("gate_lora", gate_lora), ("up_lora", up_lora)):
        if lora is None:
            continue
        z, lora_b = lora
        if z.dim() != 3 or z.shape[:2] != (num_experts, num_tokens) or lora_b.shape != (num_experts, width, z.shape[2]):
            raise ValueError(
                f"{name} must be (z (E, N, r), B (E, I, r)) with E={num_experts}, N={num_tokens}, I={width}, got "
                f"{tuple(z.shape)} and {tuple(lora_b.shape)}"
            )
    compute_dtype = expert_compute_dtype(gate.device.type, down_a.dtype)
    z_gate, b_gate = gate_lora if gate_lora is not None else (None, None)
    z_up, b_up = up_lora if up_lora is not None else (None, None)
    if torch.compiler.is_compiling():  # the same chain in plain operations: the compiler fuses it and plans its backward
        every = slice(None)
        g = _expert_outputs(gate, z_gate, b_gate, every, num_experts, scaling, compute_dtype)
        u = _expert_outputs(up, z_up, b_up, every, num_experts, scaling, compute_dtype)
        weighted = act_fn(g.clone() if works_in_place(act_fn) else g) * u * weight.to(gate.dtype)  # (E, N, I)
        down_input = weighted if mask is None else weighted * mask
        return weighted.sum(0), torch.bmm(down_input.to(compute_dtype), down_a.to(compute_dtype).transpose(1, 2))
    return _DenseGatedMixture.apply(
        gate, up, z_gate, b_gate, z_up, b_up, weight.to(gate.dtype), down_a, mask, act_fn, scaling, compute_dtype
    )
