"""Expert dispatch and expert LoRA for Mixture-of-LoRA-Experts layers.

`dispatch` turns a routing selection into (token, expert) pairs sorted by expert (one stable sort per layer).
For training-sized inputs only selected pairs are computed, unless nearly all are selected (below):
- `shared_input_lora` serves projections whose input is the token itself (gate/up): A of all experts is one
  dense (N, d) × (d, E·r) product — cheap, since E·r is small — from which each pair takes its expert's r
  values; B then runs per expert on its segment of pairs.
- `grouped_lora` serves projections whose input differs per pair (down: w_e h_e): A and B per expert segment.
For a handful of (token, slot) pairs (decoding with top-k) there is no sort at all: `slot_lora` (gate/up) applies
every expert's A in one product and every expert's B in one batched product over experts, then picks each
slot's row; `slot_lora_sum` (down, and DynMoLE's per-projection experts) adds each slot's A x into an (N, E, r)
table and applies all B in one batched product. On a few tokens computing E instead of k experts' products costs
less than copying each slot's factors.
When at least `DENSE_FRACTION` (75 %) of all pairs are selected (DynMoLE broadcasting at initialisation) there is
no dispatch either: `dense_a` / `dense_lora_sum` / `dense_b_sum` compute every pair expert-major with batched
products, unselected pairs weighing 0 (the gated chain between them: `ops.dense_mixture`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from peft_mole.ops.profiling import profiled
from peft_mole.ops.segment_ops import segment_linear
from peft_mole.ops.segmented_lora import grouped_linear, grouped_mm_serves, ints_on, linear_dtype


@dataclass
class Dispatch:
    """(token, expert) pairs of a selection, sorted by expert.

    token: (M,) token index of each pair; expert: (M,) its expert; weight: (M,) routing weight;
    counts: pairs per expert (E ints): expert e owns rows counts[:e].sum() : counts[:e+1].sum(). Under
    torch.compile the counts stay on the device: `counts` is None and `ends` (E,) holds their cumulative sums.
    """

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    counts: list[int] | None
    ends: torch.Tensor | None = None

    @property
    def segments(self) -> list[int] | torch.Tensor:
        """What `_segment_matmul` takes: the host counts, or the device ends under torch.compile."""
        return self.ends if self.counts is None else self.counts


# where `dispatch` drops unused slots with a boolean index (its size read back costs no sync there, and fewer pairs are
# sorted); elsewhere they are sorted to the end and cut off by the host count
BOOLEAN_INDEX_DEVICES = ("cpu",)


@profiled("peft_mole::dispatch")
def dispatch(weights: torch.Tensor, experts: torch.Tensor, num_experts: int) -> Dispatch:
    """Sort the selected (token, expert) pairs by expert; pairs with weight 0 (unused slots) are dropped.

    Args:
        weights: (T, k) routing weights; experts: (T, k) expert indices.
    """
    num_tokens, k = experts.shape
    flat_expert = experts.reshape(-1)
    flat_weight = weights.reshape(-1)
    if torch.compiler.is_compiling():
        return _device_dispatch(flat_expert, flat_weight, k, num_experts)
    flat_token = torch.arange(num_tokens, device=experts.device).repeat_interleave(k)
    keep = flat_weight != 0
    # one read-back (a host sync on a GPU) for both: the kept pairs of each expert in bins 0..E-1, the dropped slots in
    # bins E..2E-1
    bins = flat_expert + num_experts * ~keep
    tally = torch.bincount(bins, minlength=2 * num_experts).tolist()
    counts = tally[:num_experts]
    if any(tally[num_experts:]) and flat_expert.device.type in BOOLEAN_INDEX_DEVICES:
        flat_expert, flat_weight, flat_token = flat_expert[keep], flat_weight[keep], flat_token[keep]
        order = torch.argsort(flat_expert, stable=True)
    else:  # the dropped slots sort after every kept pair and are cut off by the host count (a boolean index would
        # read its size back: a second sync per layer on a GPU); the kept pairs' order is that of sorting them alone
        order = torch.argsort(bins, stable=True)[:sum(counts)]
    return Dispatch(token=flat_token[order], expert=flat_expert[order], weight=flat_weight[order], counts=counts)


def _device_dispatch(flat_expert: torch.Tensor, flat_weight: torch.Tensor, k: int, num_experts: int) -> Dispatch:
    """`dispatch` with shapes known before the run (under torch.compile): every one of the N·k slots is a pair, those
    of weight 0 included (they add exactly 0, though their weight gets ∂L/∂w = Σ_I ∂L/∂(w h) ⊙ h where eagerly the
    dropped pair gets none; a rule's zero weights carry no gradient to the router: top-k weights are never 0, and
    DynMoLE's are masked), and the segment ends stay on the device, so no value is read back."""
    order = torch.argsort(flat_expert, stable=True)
    expert = flat_expert[order]
    ends = torch.searchsorted(expert, torch.arange(num_experts, device=expert.device, dtype=expert.dtype), right=True)
    return Dispatch(token=order // k, expert=expert, weight=flat_weight[order], counts=None, ends=ends)


def in_adapter_precision_on_cpu(fn):
    """Run `fn` with CPU autocast off, so its products use the adapter's dtype (fp32) instead of bf16/fp16.

    The per-expert segments have new row counts at every step, and CPU bf16 GEMM (oneDNN) builds a kernel for each
    new shape: 0.8 ms per product against 0.05 ms for a shape it has seen, where fp32 GEMM has no per-shape cost
    (measured: docs/performance.md). fp32 is also the more exact of the two. On CUDA autocast applies as usual.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None:
            raise TypeError(f"{fn.__name__} needs at least one tensor argument")
        off = first.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", enabled=False) if off else contextlib.nullcontext():
            return fn(*args, **kwargs)

    return wrapper


def expert_compute_dtype(device_type: str, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a fused expert product: autocast's where it is on (on CPU the callers switch it off with
    `in_adapter_precision_on_cpu`), else the adapter's."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else adapter_dtype


SMALL_PAIRS = 64  # at most this many (token, expert) pairs (decoding): gather each pair's factors, one bmm


def _few_pairs(plan) -> bool:
    """Whether the pairs take the small-batch path (decoding). A compiled training step always takes the segment
    path: a branch on the number of pairs would be a guard on the batch's size, and a step on the other side of it
    (a short profiling or last step) would compile the graph again."""
    if torch.compiler.is_compiling() and torch.is_grad_enabled():
        return False
    return len(plan.token) <= SMALL_PAIRS


def _pair_matmul(rows: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """out[p] = rows[p] @ weight[experts[p]]ᵀ with each pair's factor gathered: one bmm, no per-expert loop.

    Cheap only for few pairs (it copies an (out, in) factor per pair); `_segment_matmul` serves many pairs.
    """
    return torch.bmm(rows.unsqueeze(1), weight.index_select(0, experts).transpose(1, 2)).squeeze(1)


def _segment_matmul(
    rows: torch.Tensor, weight: torch.Tensor, counts: list[int] | torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """out[seg_e] = base[seg_e] + rows[seg_e] @ weight[e]ᵀ for expert-sorted rows; weight: (E, out, in).

    With `base`, the addition is fused into the matmul (addmm) instead of a separate pass over (M, out). Without
    it, one grouped product (`torch._grouped_mm`, where `grouped_mm_serves`) replaces the loop over experts: on CPU
    the same numbers, 10–40 % faster per product, about 1 % of a MixLoRA step; on a GPU (bf16) one kernel where the
    loop launches one per expert (docs/performance.md). `counts` as a tensor are a compiled dispatch's segment
    ends (`Dispatch.ends`): then the product is the `segment_linear` operator, which torch.compile keeps whole.
    """
    dtype = linear_dtype(rows.device.type, weight.dtype)
    if isinstance(counts, torch.Tensor):  # the operators run in F.linear's dtype: autocast's where it is on (CUDA)
        out = segment_linear(rows.to(dtype), weight.to(dtype), counts)
        return out if base is None else base + out
    if base is None and rows.dtype == weight.dtype and grouped_mm_serves(rows.device, dtype, *weight.shape[1:]):
        return grouped_linear(rows, weight, ints_on(list(itertools.accumulate(counts)), rows.device))
    segments = torch.split(rows, counts)
    if base is None:
        outs = [seg @ weight[e].t() for e, seg in enumerate(segments) if seg.shape[0]]
    else:
        bases = torch.split(base, counts)
        outs = [torch.addmm(bases[e], seg, weight[e].t()) for e, seg in enumerate(segments) if seg.shape[0]]
    if not outs:  # no pair at all: an empty product, still in the graph (zero gradients, not none)
        return rows[:0] @ weight[0].t() if base is None else base
    return torch.cat(outs)


class _GatherSegmentLoRA(torch.autograd.Function):
    """out[p] = base[token_p] + z_p @ B_{e_p}ᵀ for expert-sorted pairs p, written segment by segment into one
    buffer: each segment's rows are gathered and updated in place while they are in cache, with no separate
    gathered copy and no concatenation. Backward: grad_base = Σ over a token's pairs (index_add),
    grad_z[seg_e] = grad_out[seg_e] B_e, grad_B_e = grad_out[seg_e]ᵀ z[seg_e]. Checked against autograd by
    torch.autograd.gradcheck in tests/ops/test_experts.py.
    """

    @staticmethod
    def forward(ctx, base, z_pairs, lora_b, token, counts):
        out = base.new_empty(token.shape[0], base.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                segment = out[start : start + n]
                torch.index_select(base, 0, token[start : start + n], out=segment)
                segment.addmm_(z_pairs[start : start + n], lora_b[e].t())
            start += n
        ctx.save_for_backward(z_pairs, lora_b, token)
        ctx.counts, ctx.num_tokens = counts, base.shape[0]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z_pairs, lora_b, token = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_base = grad_z = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_base = grad_out.new_zeros(ctx.num_tokens, grad_out.shape[1]).index_add_(0, token, grad_out)
        if ctx.needs_input_grad[1]:
            grad_z = torch.zeros_like(z_pairs)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros_like(lora_b)
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                g = grad_out[start : start + n]
                if grad_z is not None:
                    torch.mm(g, lora_b[e], out=grad_z[start : start + n])
                if grad_b is not None:
                    torch.mm(g.t(), z_pairs[start : start + n], out=grad_b[e])
            start += n
        return grad_base, grad_z, grad_b, None, None


@in_adapter_precision_on_cpu
def shared_input_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: Dispatch,
    scaling: float,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair output base[t] + s · B_e A_e x_t for pairs p = (t, e) whose input is the token x_t itself.

    Args:
        x: (N, in) tokens (dropout already applied); lora_a: (E, r, in); lora_b: (E, out, r);
        base: optional (N, out) frozen output per token, gathered to the pairs inside the same pass.
    Returns:
        (M, out) in expert-sorted pair order.
    """
    num_experts, r, _ = lora_a.shape
    z = x.to(lora_a.dtype) @ lora_a.reshape(num_experts * r, -1).t()  # (N, E·r): every expert's A x
    pair_rows = plan.token * num_experts + plan.expert
    if _few_pairs(plan):
        # few tokens (decoding): B of every expert on every token is one small bmm; keep the selected pairs
        z_all = z.reshape(-1, num_experts, r).transpose(0, 1) * scaling  # (E, N, r)
        delta_all = torch.bmm(z_all, lora_b.transpose(1, 2))  # (E, N, out)
        delta = delta_all.transpose(0, 1).reshape(-1, lora_b.shape[1]).index_select(0, pair_rows)
        return delta if base is None else base.index_select(0, plan.token).to(delta.dtype) + delta
    z_pairs = z.reshape(-1, r).index_select(0, pair_rows) * scaling  # (M, r): s · A_e x_t of each pair
    return pairs_through_b(z_pairs, lora_b, plan, base)


def pairs_through_b(
    z_pairs: torch.Tensor, lora_b: torch.Tensor, plan: Dispatch, base: torch.Tensor | None = None
) -> torch.Tensor:
    """base[t] + B_e z_p for the expert-sorted pairs p = (t, e) of `plan` (the second half of `shared_input_lora`).

    Args:
        z_pairs: (M, r) the pairs' A products, already scaled; lora_b: (E, out, r); base: (N, out) or None.
    """
    if base is None:
        return _segment_matmul(z_pairs, lora_b, plan.segments)
    # one dtype for the fused gather + addmm: autocast's where it is on (CUDA), else the adapter's; a bf16 base
    # is cast on its N rows, before the gather to M pair rows
    dtype = expert_compute_dtype(z_pairs.device.type, lora_b.dtype)
    if plan.counts is None:  # compiled: a gather and the segment product, which the compiler schedules
        return _segment_matmul(z_pairs.to(dtype), lora_b.to(dtype), plan.ends, base=base.to(dtype)[plan.token])
    return _GatherSegmentLoRA.apply(base.to(dtype), z_pairs.to(dtype), lora_b.to(dtype), plan.token, plan.counts)


def delta_sum(pair_delta: torch.Tensor, token: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ over each token's pairs of their deltas, (N, out) for the N tokens of x, in the wider of the deltas' and
    x's dtype: fp32 adapters on a bf16 base sum in fp32, and the caller rounds frozen output + sum once."""
    dtype = torch.promote_types(pair_delta.dtype, x.dtype)
    return torch.zeros(x.shape[0], pair_delta.shape[1], dtype=dtype, device=x.device).index_add(
        0, token, pair_delta.to(dtype))


@in_adapter_precision_on_cpu
def pair_a(x: torch.Tensor, lora_a: torch.Tensor, plan: Dispatch) -> torch.Tensor:
    """A_e x_t for every pair (t, e), (M, r) in pair order: every expert's A x in one (N, in) × (in, E·r) product,
    then each pair's r values."""
    num_experts, r, _ = lora_a.shape
    z = x.to(lora_a.dtype) @ lora_a.reshape(num_experts * r, -1).t()  # (N, E·r)
    return z.reshape(-1, r).index_select(0, plan.token * num_experts + plan.expert)


@in_adapter_precision_on_cpu
def segment_b(z: torch.Tensor, lora_b: torch.Tensor, plan: Dispatch, scaling: float) -> torch.Tensor:
    """s · B_e z_p for every pair, (M, out): one product per expert's segment of the expert-sorted z (M, r)."""
    return _segment_matmul(z.to(lora_b.dtype) * scaling, lora_b, plan.segments)


@in_adapter_precision_on_cpu
def grouped_lora(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, plan: Dispatch, scaling: float
) -> torch.Tensor:
    """Per-expert LoRA on expert-sorted pair rows: out[seg_e] = s · B_e A_e x[seg_e].

    Args:
        x: (M, in) pair rows sorted by expert (dropout already applied); lora_a: (E, r, in); lora_b: (E, out, r).
    Returns:
        (M, out) in the adapter dtype.
    """
    x = x.to(lora_a.dtype)
    if _few_pairs(plan):
        num_experts, r, _ = lora_a.shape
        h_all = (x @ lora_a.reshape(num_experts * r, -1).t()).reshape(-1, num_experts, r)  # (M, E, r)
        hidden = h_all.gather(1, plan.expert.view(-1, 1, 1).expand(-1, 1, r)).squeeze(1) * scaling  # (M, r)
        return _pair_matmul(hidden, lora_b, plan.expert)
    hidden = _segment_matmul(x, lora_a, plan.segments) * scaling  # (M, r)
    return _segment_matmul(hidden, lora_b, plan.segments)


DENSE_FRACTION = 0.75  # the measured crossover on one small-shape DynMoLE block, fwd + bwd (docs/performance.md):
# dense 140-190 ms at any share; dispatch 136 / 167 / 174 / 278 / 310 ms at 56 / 70 / 73 / 75 / 90 % of pairs


def dense_weights(
    weights: torch.Tensor, chosen: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The (N, E) routing weights in expert order when at least `DENSE_FRACTION` of all pairs are selected (DynMoLE
    broadcasting most tokens to every expert, or a MixLoRA top-k with k ≥ 0.75 E), else None. Unselected pairs
    weigh 0 and add exactly 0.

    With `token_mask` (N,) only real tokens decide, so a job's rows take the same path whatever padding a mixed
    batch adds to them (the two paths sum in different orders, and Adam magnifies such rounding differences).
    Fewer than `DENSE_FRACTION` of the experts in a token's k slots (MixLoRA's top-k) decide without counting. Under
    torch.compile the shapes decide, as counting would break the graph: dense when a token's k slots are at least
    `DENSE_FRACTION` of the experts (DynMoLE's E slots), which a compiled dispatch would compute anyway.
    """
    if chosen.shape[1] < DENSE_FRACTION * num_experts:  # k slots of E per token can never reach the fraction: no
        return None  # count needed (MixLoRA's top-k), so nothing is read back (a host sync on a GPU)
    if torch.compiler.is_compiling():
        return weights.new_zeros(weights.shape[0], num_experts).scatter_add(1, chosen, weights)
    selected = weights != 0
    if token_mask is None:
        chosen_pairs, tokens = int(selected.sum()), selected.shape[0]
    else:  # both counts in one read-back (a host sync on a GPU)
        real = token_mask.bool()
        chosen_pairs, tokens = torch.stack([(selected & real.unsqueeze(1)).sum(), real.sum()]).tolist()
    if chosen_pairs < DENSE_FRACTION * tokens * num_experts or tokens == 0:
        return None
    return weights.new_zeros(weights.shape[0], num_experts).scatter_add(1, chosen, weights)  # a repeat adds, as
    # dispatch counts both of its pairs


@in_adapter_precision_on_cpu
def dense_a(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """A_e x_t for every expert e and token t, (E, N, r): one (N, in) × (in, E·r) product; lora_a: (E, r, in)."""
    num_experts, r, _ = lora_a.shape
    return (x.to(lora_a.dtype) @ lora_a.reshape(num_experts * r, -1).t()).view(-1, num_experts, r).transpose(0, 1)


@in_adapter_precision_on_cpu
def dense_lora_sum(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_e w_e · s · B_e A_e x_e over every expert, (N, out): the A products, then `dense_b_sum`.

    Args:
        x: (E, N, in) one input per expert (down projection: w_e h_e), or (N, in) shared by the experts;
        lora_a: (E, r, in); lora_b: (E, out, r); weights: (N, E) w_e, None for 1.
    """
    num_experts, r, _ = lora_a.shape
    if x.dim() == 2:
        z = (x.to(lora_a.dtype) @ lora_a.reshape(num_experts * r, -1).t()).view(-1, num_experts, r)
    else:
        z = torch.bmm(x.to(lora_a.dtype), lora_a.transpose(1, 2)).transpose(0, 1)  # (N, E, r)
    if weights is not None:
        z = z * weights.to(z.dtype).unsqueeze(-1)
    return dense_b_sum(z, lora_b, scaling)


@in_adapter_precision_on_cpu
def dense_b_sum(z: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Σ_e s · B_e z_e for z (N, E, r) of every expert, (N, out): all B products and the sum over experts as one
    (N, E·r) × (E·r, out) product."""
    num_experts, _, r = lora_b.shape
    b_all = lora_b.transpose(1, 2).reshape(num_experts * r, -1).to(z.dtype)  # (E·r, out)
    return (z.reshape(z.shape[0], num_experts * r) @ b_all) * scaling


FEW_TOKENS = 8  # at most this many tokens (decoding): `slot_lora` / `slot_lora_sum` instead of dispatching
FEW_TOKENS_COMPILED = 256  # the same under torch.compile (see `takes_slot_path`)


def takes_slot_path(num_tokens: int) -> bool:
    """Whether a layer call on `num_tokens` tokens skips dispatch for the slot path (`slot_lora`, `slot_lora_sum`).

    Eagerly up to FEW_TOKENS, where the slot path is the faster one. Under torch.compile up to FEW_TOKENS_COMPILED:
    there dispatch runs its per-expert products in the `segment_linear` operator, which may read the segment sizes
    back inside it (a stream sync on a GPU, which CUDA graphs cannot capture), while the slot path has no host
    read at all. A decoding step of up to 256 rows then compiles to one graph, which CUDA graphs
    (`mode="reduce-overhead"`) can replay. Its cost, E/k times the chosen pairs' products, stayed below dispatch's
    when dispatch still broke the graph (docs/performance.md, "Compiled decoding": 128, 256 and 512 rows on the
    CPU); training batches of more tokens keep dispatch's k/E share of the products."""
    return num_tokens <= (FEW_TOKENS_COMPILED if torch.compiler.is_compiling() else FEW_TOKENS)


def used_slots(weights: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, chosen) without the slot columns that no token uses (weight 0 in every row), e.g. DynMoLE's
    (N, E) selection of a few confident tokens. Dropped slots add exactly 0, so results are unchanged.

    Eagerly on the CPU only. Elsewhere, reading `used` back is a host sync in every layer at every decoded token:
    it stalls the GPU's queue and rules out CUDA graphs. It would save less than it costs, since a few tokens'
    unused slots are a few small products. Under torch.compile it would break the graph, so it is skipped there too."""
    if weights.device.type != "cpu" or torch.compiler.is_compiling():
        return weights, chosen
    used = (weights > 0).any(dim=0)
    if bool(used.all()) or not bool(used.any()):
        return weights, chosen
    return weights[:, used], chosen[:, used]


def slot_rows(chosen: torch.Tensor, rows_per_token: int = 1) -> torch.Tensor:
    """Row of each slot (t, j) in `slot_lora`'s (E·R, out) table of every expert on every input row: the row of
    (expert chosen[t, j], input of slot tj), flattened to (N·k,). Projections with the same inputs share it.
    `rows_per_token`: 1 when a token's slots share its input, k when each slot has its own."""
    n, k = chosen.shape
    row = torch.arange(n * rows_per_token, device=chosen.device).view(n, rows_per_token)
    return (chosen * (n * rows_per_token) + row).view(-1)


def slot_lora(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, chosen: torch.Tensor, scaling: float,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """s · B_e A_e x for every token slot (t, j) with expert e = chosen[t, j], without sorting (decoding).

    Every expert's A on every input row in one product (R, E·r), every expert's B on it in one batched product
    (E, R, out), then each slot's row is picked: E/k times the (tiny) FLOPs of the chosen pairs alone, but no
    per-slot copies of the factors, which cost more than the products on a few tokens.
    Args:
        x: (N, in) tokens shared by their k slots (R = N rows), or (N, k, in) one input per slot (R = N·k rows:
        the down projection of DoRA experts, which rescale each slot's output); lora_a: (E, r, in);
        lora_b: (E, out, r); chosen: (N, k); rows: `slot_rows(chosen, R // N)`, when the caller has it.
    Returns:
        (N, k, out) in the adapter dtype.
    """
    num_experts, r, _ = lora_a.shape
    n, k = chosen.shape
    inputs = x.reshape(-1, x.shape[-1])
    if rows is None:
        rows = slot_rows(chosen, k if x.dim() == 3 else 1)
    z = (inputs.to(lora_a.dtype) @ lora_a.reshape(num_experts * r, -1).t()).view(inputs.shape[0], num_experts, r)
    out = torch.bmm(z.transpose(0, 1) * scaling, lora_b.transpose(1, 2))  # (E, R, out)
    return out.reshape(-1, out.shape[-1]).index_select(0, rows).view(n, k, out.shape[-1])


def slot_lora_sum(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, chosen: torch.Tensor, scaling: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_j w_j · s · B_{e_j} A_{e_j} x_j over each token's slots (decoding), without sorting or factor copies.

    Every expert's A on every slot input in one product; an (N, E, r) table then holds, per token, each chosen
    expert's r values and 0 elsewhere (a `where` on the slot-expert match, summed over the slots: exact, since a
    token's slots name distinct experts), so the B products of all slots and the sum over them are one batched
    product over experts and a sum.
    Args:
        x: (N, k, in) one input per slot (down projection: w_e h_e), or (N, in) shared by the slots;
        lora_a: (E, r, in); lora_b: (E, out, r); chosen: (N, k); weights: (N, k) w_j, None for 1.
    Returns:
        (N, out) in the adapter dtype.
    """
    num_experts, r, _ = lora_a.shape
    n, k = chosen.shape
    a_all = lora_a.reshape(num_experts * r, -1).t()
    inputs = x.reshape(-1, x.shape[-1]).to(lora_a.dtype)
    inputs_per_token = k if x.dim() == 3 else 1
    z = (inputs @ a_all).view(n, inputs_per_token, num_experts, r)  # every expert on every slot input
    if weights is not None:
        z = z * weights.to(z.dtype).view(n, k, 1, 1)
    is_slot_expert = (chosen.unsqueeze(-1) == torch.arange(num_experts, device=chosen.device)).unsqueeze(-1)
    per_expert = torch.where(is_slot_expert, z, 0).sum(1)  # (N, E, r)
    # s·z before B and the experts summed in their order, as the pairs' `segment_b` and index_add do
    return torch.bmm(per_expert.transpose(0, 1) * scaling, lora_b.transpose(1, 2)).sum(0)
