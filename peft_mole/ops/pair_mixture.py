"""The selected (token, expert) pairs of a MixLoRA block, from the frozen gate/up outputs to the down experts' A,
in blocks of consecutive pairs (cache-sized on the CPU, larger on a GPU: `gated.block_elements`).

For the pairs p = (t, e) of a routed MixLoRA block (MixLoRA §3, SPEC.md §1), sorted by expert (`ops.experts.
dispatch`):

    g_p = W1 x_t + B1_e z1_p,  u_p = W3 x_t + B3_e z3_p   (z_p = s·A_e dropout(x_t), (M, r))
    h_p = σ(g_p) ⊙ u_p,   hidden_t = Σ_{p of t} w_p h_p  (N, I),   z2_p = A2_e (m_t ⊙ w_p h_p)  (M, r)

with m the down projection's dropout mask (one per token, shared by its experts). The frozen W2 then runs once on
`hidden` and each expert's B2 on its z2 (`ops.experts.segment_b`).

Step by step, each product is a pass over an (M, I) tensor in memory, and autograd keeps three of them per layer
(g, u and the down experts' input). Here each block of pairs is gathered, computed and reduced while it is in cache
(a block may span experts: only the rank-r products run per expert segment); the backward recomputes g, u and h
per block from the (N, I) frozen outputs and the rank-r z, so nothing of size (M, I) is kept. The same
block-by-block formulas as `ops.dense_mixture`, where every expert's segment is every token:

    δ_p = ∂L/∂hidden_t + m_t ⊙ (∂L/∂z2_p A2_e),   ∂L/∂w_p = Σ_I δ_p ⊙ h_p,   ∂L/∂u_p = w_p δ_p ⊙ σ(g_p),
    ∂L/∂g_p = w_p δ_p ⊙ u_p ⊙ σ'(g_p),   ∂L/∂A2_e = Σ_{p of e} ∂L/∂z2_pᵀ (m_t ⊙ w_p h_p),
    ∂L/∂(W1 x)_t = Σ_{p of t} ∂L/∂g_p,   ∂L/∂z1_p = ∂L/∂g_p B1_e,   ∂L/∂B1_e = Σ_{p of e} ∂L/∂g_pᵀ z1_p

Checked against plain autograd (gradcheck) in tests/ops/test_pair_mixture.py. First derivatives only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from peft_mole.ops import gated
from peft_mole.ops.dense_mixture import chain_block_backward, gradient_sum_dtype
from peft_mole.ops.experts import expert_compute_dtype, in_adapter_precision_on_cpu
from peft_mole.ops.segmented_lora import grouped_mm_serves, ints_on


def _pair_blocks(counts: list[int], width: int, device: torch.device) -> list[tuple[slice, list[tuple[int, slice]]]]:
    """Blocks of consecutive expert-sorted pairs, at most `gated.block_elements` values each: (the block's rows,
    its expert segments as (expert, rows within the block)). A block spans experts, so a layer has
    ⌈M·I / block values⌉ blocks rather than one or more per expert: the elementwise chain runs once per block and
    only the rank-r products run per segment."""
    rows = max(1, gated.block_elements(device, gated.CHUNK_ELEMENTS) // max(width, 1))
    bounds = [0, *itertools.accumulate(counts)]
    blocks = []
    for start in range(0, bounds[-1], rows):
        stop = min(start + rows, bounds[-1])
        segments = [(e, slice(max(lo, start) - start, min(hi, stop) - start))
                    for e, (lo, hi) in enumerate(itertools.pairwise(bounds)) if max(lo, start) < min(hi, stop)]
        blocks.append((slice(start, stop), segments))
    return blocks


class _Segments:
    """The expert segments of one block of pairs and the products that run once per segment: one
    `torch._grouped_mm` over the block where `grouped_mm_serves` (`ends`: each expert's segment end in the block,
    empty segments included), else a loop of products, one per segment."""

    def __init__(self, segments: list[tuple[int, slice]], ends: torch.Tensor | None) -> None:
        self.segments, self.ends = segments, ends

    def add_products(self, out: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """out[p] += rows[p] @ weight[e] for each pair p of expert e; weight (E, K, N)."""
        if self.ends is not None:
            return out.add_(torch._grouped_mm(rows, weight, offs=self.ends))
        for expert, local in self.segments:
            out[local].addmm_(rows[local], weight[expert])
        return out

    def products(self, rows: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """rows[p] @ weight[e] for each pair p of expert e, (n, N); weight (E, K, N)."""
        if self.ends is not None:
            found = torch._grouped_mm(rows, weight, offs=self.ends)
            return found if out is None else out.copy_(found)
        out = rows.new_empty(rows.shape[0], weight.shape[2]) if out is None else out
        for expert, local in self.segments:
            if out.dtype == rows.dtype:
                torch.mm(rows[local], weight[expert], out=out[local])
            else:
                out[local] = rows[local] @ weight[expert]
        return out

    def add_outer_sums(self, out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        """out[e] += Σ_{p of e} left[p]ᵀ right[p] (out in its own dtype, float32 at least)."""
        if self.ends is not None:
            out += torch._grouped_mm(left.t(), right, offs=self.ends).to(out.dtype)
            return
        for expert, local in self.segments:
            out[expert] += (left[local].t() @ right[local]).to(out.dtype)


GROUPED_MIN_SEGMENTS = 3  # a block of fewer expert segments loops: on the CPU's cache-sized blocks (1-2 segments
# each) grouped products made the small-shape MixLoRA step 7 % slower (docs/performance.md, "Grouped expert products")


def _block_segments(blocks, num_experts: int, dims: list[int], dtype: torch.dtype, device: torch.device):
    """A `_Segments` per block: grouped products for the blocks of at least `GROUPED_MIN_SEGMENTS` expert segments
    where `grouped_mm_serves`, a loop for the others. Every grouped block's expert ends go to the device in one copy
    (`ints_on`: no stream sync).
    `dims`: the products' inner and outer sizes (I and the ranks)."""
    grouped = [len(segments) >= GROUPED_MIN_SEGMENTS for _, segments in blocks]
    if not any(grouped) or not grouped_mm_serves(device, dtype, *dims):
        return [_Segments(segments, None) for _, segments in blocks]
    table = []
    for (_, segments), use in zip(blocks, grouped, strict=True):
        if use:
            ends = [0] * num_experts
            for expert, local in segments:
                ends[expert] = local.stop
            for expert in range(1, num_experts):  # an expert absent from the block ends where the one before it ends
                ends[expert] = max(ends[expert], ends[expert - 1])
            table.append(ends)
    found = iter(ints_on(table, device))
    return [_Segments(segments, next(found) if use else None) for (_, segments), use in zip(blocks, grouped, strict=True)]


def _pair_outputs(frozen, tokens, z, lora_b, segments, compute_dtype):
    """frozen[t] + B_e z_p for one block of pairs, (n, I) in the frozen output's dtype; z (n, r) and lora_b (E, I, r)
    already in the compute dtype."""
    gathered = frozen.index_select(0, tokens)
    if z is None:
        return gathered
    if _sums_in_place(gathered, compute_dtype):
        return gathered.add_(segments.products(z, lora_b.transpose(1, 2)))
    return segments.add_products(gathered.to(compute_dtype), z, lora_b.transpose(1, 2)).to(frozen.dtype)


def _sums_in_place(gathered: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether a narrower frozen output (a bf16 base with fp32 adapters) takes the compute-dtype LoRA sum in place:
    the add promotes to the compute dtype and rounds once, the numbers of `(gathered.to(cd) + B_e z_p).to(bf16)`
    without its two (pairs × I) casts. Off the CPU only: there one mixed-dtype kernel replaces three; the CPU's
    mixed-dtype elementwise loop is slower than its two vectorised casts (a small-shape MixLoRA step took 1.08-1.09×
    the time, interleaved A/B)."""
    return (gathered.device.type != "cpu" and gathered.dtype != compute_dtype
            and torch.promote_types(gathered.dtype, compute_dtype) == compute_dtype)


def _in_dtype(tensor, dtype):
    return None if tensor is None else tensor.to(dtype)


class _PairGatedMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, z_gate, b_gate, z_up, b_up, weight, down_a, mask, token, counts, act_fn, compute_dtype):
        device = gate.device.type
        ctx.act_fn, ctx.counts, ctx.compute_dtype = act_fn, counts, compute_dtype
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(gate, up, z_gate, b_gate, z_up, b_up, weight, down_a, mask, token)
        cd = compute_dtype
        z_gate_cd, b_gate_cd, z_up_cd, b_up_cd, a_cd = (_in_dtype(t, cd) for t in (z_gate, b_gate, z_up, b_up, down_a))
        hidden = gate.new_zeros(gate.shape)
        z_down = torch.empty(token.shape[0], down_a.shape[1], dtype=cd, device=gate.device)
        with torch.autocast(device, enabled=False):
            blocks = _pair_blocks(counts, gate.shape[1], gate.device)
            segment_sets = _block_segments(blocks, len(counts), _dims(gate, down_a, z_gate, z_up), cd, gate.device)
            for (rows, _), segments in zip(blocks, segment_sets, strict=True):
                tokens = token[rows]
                g = _pair_outputs(gate, tokens, _rows_of(z_gate_cd, rows), b_gate_cd, segments, cd)
                u = _pair_outputs(up, tokens, _rows_of(z_up_cd, rows), b_up_cd, segments, cd)
                with torch.autocast(device, dtype=ctx.autocast[2], enabled=ctx.autocast[1]):
                    activated = gated.activate_apart(act_fn, g)
                weighted = activated.mul_(u).mul_(weight[rows].unsqueeze(-1))  # w_p h_p (n, I)
                _add_by_segment(hidden, tokens, weighted.to(hidden.dtype), segments)
                if mask is not None:
                    weighted.mul_(mask.index_select(0, tokens))
                segments.products(weighted.to(cd), a_cd.transpose(1, 2), out=z_down[rows])
        return hidden, z_down

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hidden, grad_z_down):
        # dense: `torch._grouped_mm` refuses an expanded gradient (stride 0, e.g. of `z.sum()`), as in `grouped_linear`
        grad_hidden, grad_z_down = grad_hidden.contiguous(), grad_z_down.contiguous()
        gate, up, z_gate, b_gate, z_up, b_up, weight, down_a, mask, token = ctx.saved_tensors
        device = ctx.autocast[0]
        names = ("gate", "up", "z_gate", "b_gate", "z_up", "b_up", "weight", "down_a")
        inputs = dict(zip(names, (gate, up, z_gate, b_gate, z_up, b_up, weight, down_a), strict=True))
        needs = dict(zip(names, ctx.needs_input_grad[:8], strict=True))
        grads = {name: None for name in names}
        for name in names:
            if needs[name]:
                if name in ("b_gate", "b_up", "down_a"):  # summed over blocks, in fp32 at least
                    grads[name] = torch.zeros_like(inputs[name], dtype=gradient_sum_dtype(inputs[name].dtype))
                elif name in ("gate", "up"):  # summed over a token's pairs
                    grads[name] = torch.zeros_like(inputs[name])
                else:
                    grads[name] = torch.empty_like(inputs[name])
        cd = ctx.compute_dtype
        in_cd = {name: _in_dtype(inputs[name], cd) for name in ("z_gate", "b_gate", "z_up", "b_up", "down_a")}
        with torch.autocast(device, enabled=False):
            blocks = _pair_blocks(ctx.counts, gate.shape[1], gate.device)
            segment_sets = _block_segments(blocks, len(ctx.counts), _dims(gate, down_a, z_gate, z_up), cd,
                                           gate.device)
            for (rows, _), segments in zip(blocks, segment_sets, strict=True):
                tokens = token[rows]
                g = _pair_outputs(gate, tokens, _rows_of(in_cd["z_gate"], rows), in_cd["b_gate"], segments, cd)
                u = _pair_outputs(up, tokens, _rows_of(in_cd["z_up"], rows), in_cd["b_up"], segments, cd)
                w = weight[rows].unsqueeze(-1)
                m = None if mask is None else mask.index_select(0, tokens)
                grad_z = grad_z_down[rows].to(cd)
                delta_z = segments.products(grad_z, in_cd["down_a"])  # ∂L/∂z2_p A2_e
                grad_g, grad_u, grad_w, down_input = chain_block_backward(
                    ctx, g, u, w, m, delta_z, grad_hidden.index_select(0, tokens),
                    needs["weight"], needs["down_a"],
                )
                if grad_w is not None:
                    grads["weight"][rows] = grad_w.squeeze(-1)
                if down_input is not None:  # ∂L/∂A2_e = Σ_{p of e} ∂L/∂z2_pᵀ (m_t ⊙ w_p h_p)
                    segments.add_outer_sums(grads["down_a"], grad_z, down_input.to(cd))
                for frozen, z, b, grad_pair in (("gate", "z_gate", "b_gate", grad_g), ("up", "z_up", "b_up", grad_u)):
                    if needs[frozen]:
                        _add_by_segment(grads[frozen], tokens, grad_pair.to(grads[frozen].dtype), segments)
                    if inputs[z] is None:
                        continue
                    grad_cd = grad_pair.to(cd)
                    if needs[z]:  # ∂L/∂z_p = ∂L/∂pair_p B_e
                        segments.products(grad_cd, in_cd[b], out=grads[z][rows])
                    if needs[b]:
                        segments.add_outer_sums(grads[b], grad_cd, in_cd[z][rows])
        for name in ("b_gate", "b_up", "down_a"):
            if grads[name] is not None:
                grads[name] = grads[name].to(inputs[name].dtype)
        return (*grads.values(), None, None, None, None, None)


def _add_by_segment(out, tokens, values, segments):
    """out[tokens] += values. Off the CPU one expert segment at a time: a block that spans experts holds a token
    once per expert, and one `index_add_` over repeated indices would add them in no fixed order on CUDA (atomics);
    within a segment every token is distinct, so the sums stay deterministic. The CPU adds in index order."""
    if out.device.type == "cpu":
        out.index_add_(0, tokens, values)
        return
    for _, local in segments.segments:
        out.index_add_(0, tokens[local], values[local])


def _dims(gate, down_a, z_gate, z_up) -> list[int]:
    return [gate.shape[1], down_a.shape[1], *(z.shape[1] for z in (z_gate, z_up) if z is not None)]


def _rows_of(tensor, rows):
    return None if tensor is None else tensor[rows]


@in_adapter_precision_on_cpu
def pair_gated_mixture(
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    down_a: torch.Tensor,
    token: torch.Tensor,
    counts: list[int],
    mask: torch.Tensor | None = None,
    gate_lora: tuple[torch.Tensor, torch.Tensor] | None = None,
    up_lora: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_{p of t} w_p σ(g_p) ⊙ u_p per token, A2_e (m_t ⊙ w_p σ(g_p) ⊙ u_p) per pair), blockwise (see the module).

    Args:
        gate: (N, I) the frozen W1 x.
        up: (N, I) the frozen W3 x.
        weight: (M,) routing weight of each pair, pairs sorted by expert.
        act_fn: the MLP's activation σ.
        down_a: (E, r, I) the down experts' A2_e.
        token: (M,) token of each pair.
        counts: pairs per expert (E ints, summing to M).
        mask: (N, I) the down projection's dropout mask m (already scaled by 1 / (1 − p)), or None.
        gate_lora: (z, B) with z (M, r) = s·A1_e dropout(x_t) per pair and B (E, I, r), or None for a gate
            without experts.
        up_lora: the same for the up projection.
    Returns:
        hidden (N, I) in the frozen outputs' dtype, and z2 (M, r) in the dtype of the expert products: the
        adapter's, or autocast's where it is on (not on CPU, as for the other expert products: `ops.experts`).
    """
    if gate.dim() != 2 or up.shape != gate.shape:
        raise ValueError(f"gate and up must both be (N, I), got {tuple(gate.shape)} and {tuple(up.shape)}")
    num_pairs, (num_tokens, width) = token.shape[0], gate.shape
    if weight.shape != (num_pairs,) or sum(counts) != num_pairs:
        raise ValueError(f"weight must be (M,) and counts sum to M = {num_pairs} pairs, got weight "
                         f"{tuple(weight.shape)} and counts summing to {sum(counts)}")
    if down_a.dim() != 3 or down_a.shape[0] != len(counts) or down_a.shape[2] != width:
        raise ValueError(f"down_a must be (E, r, I) with E={len(counts)}, I={width}, got {tuple(down_a.shape)}")
    if mask is not None and mask.shape != (num_tokens, width):
        raise ValueError(f"mask must be (N, I) = {(num_tokens, width)}, got {tuple(mask.shape)}")
    for name, lora in (("gate_lora", gate_lora), ("up_lora", up_lora)):
        if lora is not None and (lora[0].shape[0] != num_pairs or lora[1].shape != (len(counts), width, lora[0].shape[1])):
            raise ValueError(f"{name} must be (z (M, r), B (E, I, r)) with M={num_pairs}, E={len(counts)}, I={width}, "
                             f"got {tuple(lora[0].shape)} and {tuple(lora[1].shape)}")
    compute_dtype = expert_compute_dtype(gate.device.type, down_a.dtype)
    z_gate, b_gate = gate_lora if gate_lora is not None else (None, None)
    z_up, b_up = up_lora if up_lora is not None else (None, None)
    return _PairGatedMixture.apply(gate, up, z_gate, b_gate, z_up, b_up, weight.to(gate.dtype), down_a, mask, token,
                                   list(counts), act_fn, compute_dtype)
