"""The MixLoRA block of a compiled multi-job step: every job's router and experts as one table, each row routed
within its own job's part of it, so that one graph serves every mix of jobs and rows.

The eager block (`MixLoRAMLP.forward`) groups the rows by job in Python; compiled, each new mix of jobs and rows
would be a new graph. Here the mix is data: `ForwardContext.row_jobs`, one job index per row. With the MixLoRA jobs
J_1..J_m of this layer in a fixed order, expert e of job j is global expert o_j + e (o_j = Σ_{i<j} E_i), plus one
last "null" expert with zero factors for rows of other jobs (plain LoRA jobs) and base-only rows:

    logits = W_j x in job j's columns, -inf elsewhere   (each token's own router: one product per job segment)
    p = softmax(logits)  = the token's own router softmax, exactly (SPEC.md §1)
    top-k with k = max_j k_j, the slots past the token's own k_j weighted 0, the rest renormalised

so a MixLoRA token gets its own job's top-k weights and experts, and any other token weight 1 on the null expert:
h = σ(W1 x) ⊙ (W3 x), Σ w = 1 and no delta, the plain MLP. The experts then run as one MoE of Σ E_j + 1 experts
(`ops.experts`: dispatch, the gate/up products on the shared frozen W1 x, W3 x, the gated activation, the down
products, MixLoRA §3): each job's scaling s_j is folded into its B factors, ranks are padded with zeros, and
dropout is drawn per row with the row's job's rate. Router statistics are recorded per job over all tokens with a
mask of the job's real tokens (`RouterRecord.loss_inputs`), so each job's auxiliary loss is its own.

Memory: the pairs are k_max per token, LoRA and base rows included, and the chain from the pairs' frozen outputs to
the down experts' input keeps four (pairs, I) tensors for the backward; it runs under `torch.utils.checkpoint`
(non-reentrant, traced by Dynamo), so they are recomputed in the backward instead: small shape, compiled, 4 rows of
128 tokens, 164 MB kept against 248 MB, about 4 % more step time (docs/performance.md). Where the decoder layers
are checkpointed already (`MixLoRAMLP.layer_checkpointed`, set by `compile_mixed_steps`), the layer's recompute
does it.

The routers and the gate and up experts' A products run per job segment of the job-sorted tokens (one product per
job, each token with its own job's E_max (· r) columns, `_job_a_products`), then each pair takes its expert's r
values; the B products and the down experts run per global expert. A token never meets another job's router or
experts (a slot past its own k goes to the null expert), so a job whose weights turned NaN leaves the other jobs'
outputs, aux losses and gradients finite, as eagerly (tests/multijob/test_faults.py). What is not the eager block:
numbers equal to rounding (tests/multijob/test_compiled_moe_steps.py); dropout masks are drawn in another order.
MixLoRA jobs only: DynMoLE's rule picks a data-dependent number of experts and DoRA experts rescale per pair, so a
block holding such a job runs its grouped form eagerly inside the compiled step instead
(`MixLoRAMLP._per_row_serves`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from peft_mole import routing
from peft_mole.finite_check import raise_if_not_finite
from peft_mole.forward_context import RouterRecord
from peft_mole.ops.experts import (
    _segment_matmul,
    delta_sum,
    dispatch,
    grouped_lora,
    in_adapter_precision_on_cpu,
    pairs_through_b,
)
from peft_mole.ops.gated import weighted_gated_activation
from peft_mole.ops.indexed_lora import per_row_dropout
from peft_mole.ops.job_streams import per_job_jitter
from peft_mole.ops.segmented_lora import constant_on

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def top_k_of(rule) -> tuple[int, bool] | None:
    """(k, renormalize) of a top-k routing rule (`MixLoRAConfig.routing_rule`), or None for any other rule."""
    if isinstance(rule, functools.partial) and rule.func is routing.top_k_routing:
        return rule.keywords["k"], rule.keywords.get("renormalize", True)
    return None


@in_adapter_precision_on_cpu  # the eager block's expert products run in fp32 on a CPU under autocast too
def per_row_mixture(layer, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, token_mask: torch.Tensor | None):
    """(hidden Σ_e w_e h_e (B, T, I), down delta (B, T, d) or None, Σ_e w_e (B, T, 1)) of the module docstring for
    `layer` (a `MixLoRAMLP`) on x (B, T, d) and its frozen gate/up outputs; token_mask: (B, T) real tokens or None."""
    context = layer._context
    jobs = [job for job in context.jobs if job in layer.routers]
    batch, seq, width = x.shape
    tokens = batch * seq
    device = x.device
    table = _job_table(layer, jobs, context.jobs, device)
    token_jobs = context.row_jobs.to(device)  # (N,): one job per token (a packed batch) or per row
    if context.segments is None:
        token_jobs = token_jobs.view(batch, 1).expand(batch, seq).reshape(-1)

    # routing: every router at once, each token within its own job's columns
    router_input = x.reshape(tokens, width).float()
    if layer.training and table["jitter"] and any(table["jitter_streams"]):  # each job's own stream, as eagerly
        router_input = router_input * per_job_jitter(router_input.detach(), token_jobs, table["jitter_list"],
                                                     table["jitter_streams"])
    elif layer.training and table["jitter"]:
        eps = table["jitter_of"].index_select(0, token_jobs).unsqueeze(1)
        router_input = router_input * (1.0 + eps * (2.0 * torch.rand_like(router_input) - 1.0))
    order = _job_order(context, token_jobs)
    with torch.autocast(device.type, enabled=False):  # fp32 router even under autocast, as `route`
        own = _job_a_products(router_input, _routers_by_job(layer, context.jobs, table, width, device), order)
    if context.check_finite:
        raise_if_not_finite(own, f"the router logits of {layer.layer_name} (jobs {jobs})")
    # (N, Σ E + 1): the token's own logits in its job's columns (the null one for other tokens), -inf elsewhere
    logits = own.new_full((tokens, table["experts"] + 1), float("-inf"))
    logits = logits.scatter(1, table["column_of"].index_select(0, token_jobs), own)[:, :-1]
    probs = torch.softmax(logits, dim=-1)
    weights, chosen = routing.largest(probs, table["k"])  # (ties to the lowest expert, as the eager rule)
    kept = torch.arange(table["k"], device=device) < table["k_of"].index_select(0, token_jobs).unsqueeze(1)
    weights = torch.where(kept, weights, 0.0)
    # a slot past the token's own k (or a pick outside its columns, where its router gave NaN) goes to the null
    # expert: never to another job's experts, whose non-finite values would reach this token's gradients as 0 · NaN
    allowed = table["allowed"].index_select(0, token_jobs).gather(1, chosen)
    chosen = torch.where(kept & allowed, chosen, table["experts"] - 1)
    renormalized = weights / weights.sum(dim=-1, keepdim=True)
    weights = torch.where(table["renormalize_of"].index_select(0, token_jobs).unsqueeze(1), renormalized, weights)
    _record(layer, table, probs, chosen, weights, token_jobs, token_mask)

    # the experts of every job as one table, scalings folded into B, ranks padded
    dropouts = [layer.dropouts[job] if job in layer.routers else None for job in context.jobs]
    x_dropped = per_row_dropout(x.reshape(tokens, width), token_jobs, dropouts)  # per token: the row's draws
    plan = dispatch(weights, chosen, table["experts"])
    gate_flat, up_flat = gate.reshape(tokens, -1), up.reshape(tokens, -1)
    factors = {proj: _stacked_factors(layer, jobs, proj, table["rank"], with_a=proj == "down_proj")
               for proj in PROJECTIONS}
    keep = None
    if factors["down_proj"] is not None:  # drawn for the jobs with down experts alone, as their eager blocks draw
        # (until 2026-12-07 also for a job without: an extra draw from its stream, its later masks not its own)
        down = [d if d is not None and layer.experts[job].factors("down_proj") is not None else None
                for d, job in zip(dropouts, context.jobs, strict=True)]
        keep = per_row_dropout(torch.ones_like(gate_flat), token_jobs, down)

    def pair_chain():
        pre = {}  # the pairs' frozen output plus their expert's LoRA, (M, I), for gate and up
        for proj, frozen in (("gate_proj", gate_flat), ("up_proj", up_flat)):
            if factors[proj] is None:
                pre[proj] = frozen.index_select(0, plan.token)
                continue
            z = _job_a_products(x_dropped, _a_by_job(layer, context.jobs, proj, table), order)  # (N, E_max·r)
            pair_rows = plan.token * table["max_experts"] + table["local_of"].index_select(0, plan.expert)
            z_pairs = z.reshape(-1, table["rank"]).index_select(0, pair_rows)  # (M, r): A_e x_t of each pair
            pre[proj] = pairs_through_b(z_pairs, factors[proj][1], plan, base=frozen).to(frozen.dtype)
        gs, us = pre["gate_proj"], pre["up_proj"]
        weighted = weighted_gated_activation(gs, us, plan.weight.unsqueeze(-1), layer.base_layer.act_fn)  # (M, I)
        hidden = torch.zeros_like(gate_flat).index_add(0, plan.token, weighted)
        weight_sum = gate_flat.new_zeros(tokens, 1).index_add(0, plan.token, plan.weight.to(gate.dtype).unsqueeze(-1))
        down_delta = None
        if factors["down_proj"] is not None:
            pair_delta = grouped_lora(weighted * keep.index_select(0, plan.token), *factors["down_proj"], plan, 1.0)
            down_delta = delta_sum(pair_delta, plan.token, x.reshape(tokens, width)).view(batch, seq, -1)
        return hidden, weight_sum, down_delta

    if torch.is_grad_enabled() and not layer.layer_checkpointed:  # (a checkpointed layer recomputes it all)
        hidden, weight_sum, down_delta = checkpoint(pair_chain, use_reentrant=False)  # (M, I) pairs not kept
    else:
        hidden, weight_sum, down_delta = pair_chain()
    return hidden.view(gate.shape), down_delta, weight_sum.view(batch, seq, 1)


def _job_order(context, token_jobs: torch.Tensor) -> tuple:
    """(order, inverse, segments): the tokens sorted by job (stable), the permutation back, and the job segments
    as `_segment_matmul` takes them (host counts eagerly; under torch.compile the ends, kept on the device). A
    packed batch brings its own from the host (`ForwardContext.segments`), order and inverse None where its tokens
    are in job order already."""
    if context.segments is not None:
        segments = context.segments.to(token_jobs.device)
        return (*(segments.order or (None, None)), segments.ends)
    num_slots = len(context.jobs) + 1
    order = torch.argsort(token_jobs, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    if torch.compiler.is_compiling():
        slots = torch.arange(num_slots, device=token_jobs.device, dtype=token_jobs.dtype)
        return order, inverse, torch.searchsorted(token_jobs.index_select(0, order), slots, right=True)
    return order, inverse, torch.bincount(token_jobs, minlength=num_slots).tolist()


def _job_a_products(x: torch.Tensor, a_by_job: torch.Tensor, order) -> torch.Tensor:
    """Each token's own job's expert A products, (N, E_max·r): one product per job segment of the job-sorted
    tokens (LoRA jobs' and base rows' segments meet zero factors), so a token never meets another job's experts."""
    order, inverse, segments = order
    z_sorted = _segment_matmul((x if order is None else x.index_select(0, order)).to(a_by_job.dtype), a_by_job,
                               segments)
    return z_sorted if inverse is None else z_sorted.index_select(0, inverse)


def _routers_by_job(layer, all_jobs: tuple[str, ...], table: dict, width: int, device: torch.device) -> torch.Tensor:
    """(len(all_jobs) + 1, E_max, d) fp32: per job of the step's order (and the base slot), its router padded to
    E_max experts; zeros for jobs without a router here (their tokens' one logit, the null expert's, is 0)."""
    zero = torch.zeros(table["max_experts"], width, device=device)
    return torch.stack([
        F.pad(layer.routers[job].weight.float(), (0, 0, 0, table["max_experts"] - layer.settings[job].num_experts))
        if job in table["offsets"] else zero for job in (*all_jobs, None)])


def _a_by_job(layer, all_jobs: tuple[str, ...], proj: str, table: dict) -> torch.Tensor:
    """(len(all_jobs) + 1, E_max·r, in): per job of the step's order (and the base slot), its experts' A on `proj`
    padded to E_max experts of rank r; zeros for jobs without experts there."""
    rank, max_experts = table["rank"], table["max_experts"]
    example = next(layer.experts[j].factors(proj)[0] for j in table["offsets"] if layer.experts[j].factors(proj))
    zero = example.new_zeros(max_experts * rank, example.shape[2])
    slots = []
    for job in (*all_jobs, None):
        factors = layer.experts[job].factors(proj) if job in table["offsets"] else None
        if factors is None:
            slots.append(zero)
            continue
        lora_a = factors[0]  # (E_j, r_j, in)
        padded = F.pad(lora_a, (0, 0, 0, rank - lora_a.shape[1], 0, max_experts - lora_a.shape[0]))
        slots.append(padded.reshape(max_experts * rank, -1))
    return torch.stack(slots)


def _job_table(layer, jobs: list[str], all_jobs: tuple[str, ...], device: torch.device) -> dict:
    """Per-job settings as constant tensors indexed by a job's position in `all_jobs` (the last index: base rows)."""
    sizes = [layer.settings[job].num_experts for job in jobs]
    total = sum(sizes) + 1
    top = {job: top_k_of(layer.settings[job].rule) for job in jobs}
    offsets, allowed, column_of, k_of, renorm_of, jitter_of = {}, [], [], [], [], []
    start = 0
    for job, size in zip(jobs, sizes, strict=True):
        offsets[job] = start
        start += size
    for job in (*all_jobs, None):
        columns = [False] * total
        if job in offsets:
            columns[offsets[job]: offsets[job] + layer.settings[job].num_experts] = [True] * sizes[jobs.index(job)]
        else:
            columns[-1] = True
        allowed.append(tuple(columns))
        # where each of the token's E_max router outputs goes among the Σ E + 1 columns; `total`: none (dropped)
        own = range(offsets[job], offsets[job] + layer.settings[job].num_experts) if job in offsets else [total - 1]
        column_of.append(tuple(own) + (total,) * (max(sizes) - len(own)))
        k_of.append(top[job][0] if job in offsets else 1)
        renorm_of.append(top[job][1] if job in offsets else False)
        jitter_of.append(layer.settings[job].jitter_noise if job in offsets else 0.0)
    factors = [layer.experts[job].factors(proj) for job in jobs for proj in PROJECTIONS]
    ranks = [f[0].shape[1] for f in factors if f is not None]
    local_of = tuple(e for size in sizes for e in range(size)) + (0,)  # each global expert's index in its job
    return {
        "offsets": offsets, "experts": total, "k": max(k_of), "rank": max(ranks, default=0),
        "max_experts": max(sizes), "local_of": constant_on(local_of, torch.int64, device),
        "allowed": constant_on(tuple(allowed), torch.bool, device),
        "column_of": constant_on(tuple(column_of), torch.int64, device),
        "k_of": constant_on(tuple(k_of), torch.int64, device),
        "renormalize_of": constant_on(tuple(renorm_of), torch.bool, device),
        "jitter": any(jitter_of), "jitter_of": constant_on(tuple(jitter_of), torch.float32, device),
        "jitter_list": [float(e) for e in jitter_of[:-1]],
        "jitter_streams": [layer.settings[job].jitter_stream if job in offsets else 0 for job in all_jobs],
    }


def _stacked_factors(layer, jobs: list[str], proj: str, rank: int, with_a: bool = True) -> tuple | None:
    """(A (Σ E + 1, r, in) or None without `with_a`, s·B (Σ E + 1, out, r)) of every job's experts on `proj`, zeros
    for a job without experts there and for the null expert; None when no job has experts on `proj`."""
    present = {job: layer.experts[job].factors(proj) for job in jobs}
    if all(f is None for f in present.values()):
        return None
    first_a, first_b = next(f for f in present.values() if f is not None)
    in_features, out_features = first_a.shape[2], first_b.shape[1]
    a_parts, b_parts = [], []
    for job in jobs:
        factors, size = present[job], layer.settings[job].num_experts
        if factors is None:
            a_parts.append(first_a.new_zeros(size, rank, in_features))
            b_parts.append(first_b.new_zeros(size, out_features, rank))
            continue
        lora_a, lora_b = factors
        pad = rank - lora_a.shape[1]
        a_parts.append(F.pad(lora_a, (0, 0, 0, pad)))
        b_parts.append(F.pad(lora_b * layer.settings[job].scaling, (0, pad)))
    a_parts.append(first_a.new_zeros(1, rank, in_features))
    b_parts.append(first_b.new_zeros(1, out_features, rank))
    return (torch.cat(a_parts) if with_a else None), torch.cat(b_parts)


def _record(layer, table, probs, chosen, weights, token_jobs, token_mask) -> None:
    """One router record per job: its columns of every token, with the mask of its own real tokens."""
    records = layer._context.records
    if records is None:
        return
    with torch.no_grad():
        selected = routing.selection_mask(chosen, weights, table["experts"])
    real = None if token_mask is None else token_mask.reshape(-1)
    for position, job in enumerate(layer._context.jobs):
        if job not in table["offsets"]:
            continue
        start = table["offsets"][job]
        columns = slice(start, start + layer.settings[job].num_experts)
        own = token_jobs == position
        mask = own if real is None else own & real
        records.append(RouterRecord(layer.layer_name, job, probs, selected[:, columns], mask, columns=columns))
