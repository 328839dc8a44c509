"""The MixLoRA block of a compiled multi-job step: every job's router and experts as one table, each row routed
within its own job's part of it, so that one graph serves every mix of jobs and rows.

The eager block (`MixLoRAMLP.forward`) groups the rows by job in Python; compiled, each new mix of jobs and rows
would be a new graph. Here the mix is data: `ForwardContext.row_jobs`, one job index per row. With the MixLoRA jobs
J_1..J_m of this layer in a fixed order, expert e of job j is global expert o_j + e (o_j = Σ_{i<j} E_i), plus one
last "null" expert with zero factors for rows of other jobs (plain LoRA jobs) and base-only rows:

    logits = W x,  W = [W_1; ...; W_m; 0]          (every router on every token, (N, Σ E_j + 1))
    p = softmax(logits masked to the token's part)  = the token's own router softmax, exactly (SPEC.md §1)
    top-k with k = max_j k_j, the slots past the token's own k_j weighted 0, the rest renormalised

so a MixLoRA token gets its own job's top-k weights and experts, and any other token weight 1 on the null expert:
h = σ(W1 x) ⊙ (W3 x), Σ w = 1 and no delta, the plain MLP. The experts then run as one MoE of Σ E_j + 1 experts
(`ops.experts`: dispatch, the gate/up products on the shared frozen W1 x, W3 x, the gated activation, the down
products, MixLoRA §3): each job's scaling s_j is folded into its B factors, ranks are padded with zeros, and
dropout is drawn per row with the row's job's rate. Router statistics are recorded per job over all tokens with a
mask of the job's real tokens (`RouterRecord.loss_inputs`), so each job's auxiliary loss is its own.

What is not the eager block: the router runs on every token for every job (m · E · d multiply-adds per token, small
beside the MLP), and the A products of every expert on every token (m · E · r columns, as the eager block computes
its own E · r); numbers equal to rounding (tests/multijob/test_compiled_moe_steps.py); dropout masks are drawn in
another order. MixLoRA jobs only: DynMoLE's rule picks a data-dependent number of experts (its single-adapter
compiled step runs the block eagerly for that reason) and DoRA experts rescale per pair (`check_compilable`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from peft_mole import routing
from peft_mole.finite_check import raise_if_not_finite
from peft_mole.forward_context import RouterRecord
from peft_mole.ops.experts import dispatch, grouped_lora, shared_input_lora
from peft_mole.ops.gated import weighted_gated_activation
from peft_mole.ops.indexed_lora import per_row_dropout
from peft_mole.ops.segmented_lora import constant_on

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def top_k_of(rule) -> tuple[int, bool] | None:
    """(k, renormalize) of a top-k routing rule (`MixLoRAConfig.routing_rule`), or None for any other rule."""
    if isinstance(rule, functools.partial) and rule.func is routing.top_k_routing:
        return rule.keywords["k"], rule.keywords.get("renormalize", True)
    return None


def per_row_mixture(layer, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, token_mask: torch.Tensor | None):
    """(hidden Σ_e w_e h_e (B, T, I), down delta (B, T, d) or None, Σ_e w_e (B, T, 1)) of the module docstring for
    `layer` (a `MixLoRAMLP`) on x (B, T, d) and its frozen gate/up outputs; token_mask: (B, T) real tokens or None."""
    context = layer._context
    jobs = [job for job in context.jobs if job in layer.routers]
    batch, seq, width = x.shape
    tokens = batch * seq
    device = x.device
    table = _job_table(layer, jobs, context.jobs, device)
    token_jobs = context.row_jobs.to(device).view(batch, 1).expand(batch, seq).reshape(-1)  # (N,)

    # routing: every router at once, each token within its own job's columns
    router_input = x.reshape(tokens, width).float()
    if layer.training and table["jitter"]:
        eps = table["jitter_of"].index_select(0, token_jobs).unsqueeze(1)
        router_input = router_input * (1.0 + eps * (2.0 * torch.rand_like(router_input) - 1.0))
    weight = torch.cat([layer.routers[job].weight.float() for job in jobs]
                       + [router_input.new_zeros(1, width)])  # (Σ E + 1, d)
    if torch.is_autocast_enabled(device.type):
        with torch.autocast(device.type, enabled=False):  # fp32 router even under autocast, as `route`
            logits = F.linear(router_input, weight)
    else:
        logits = F.linear(router_input, weight)
    if context.check_finite:
        raise_if_not_finite(logits, f"the router logits of {layer.layer_name} (jobs {jobs})")
    allowed = table["allowed"].index_select(0, token_jobs)  # (N, Σ E + 1)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    weights, chosen = torch.topk(probs, table["k"], dim=-1)
    kept = torch.arange(table["k"], device=device) < table["k_of"].index_select(0, token_jobs).unsqueeze(1)
    weights = torch.where(kept, weights, 0.0)
    renormalized = weights / weights.sum(dim=-1, keepdim=True)
    weights = torch.where(table["renormalize_of"].index_select(0, token_jobs).unsqueeze(1), renormalized, weights)
    _record(layer, table, probs, chosen, weights, token_jobs, token_mask)

    # the experts of every job as one table, scalings folded into B, ranks padded
    rows_jobs = context.row_jobs.to(device)
    dropouts = [layer.dropouts[job] if job in layer.routers else None for job in context.jobs]
    x_dropped = per_row_dropout(x, rows_jobs, dropouts).reshape(tokens, width)
    plan = dispatch(weights, chosen, table["experts"])
    gate_flat, up_flat = gate.reshape(tokens, -1), up.reshape(tokens, -1)
    factors = {proj: _stacked_factors(layer, jobs, proj, table["rank"]) for proj in PROJECTIONS}
    gs = gate_flat.index_select(0, plan.token) if factors["gate_proj"] is None else shared_input_lora(
        x_dropped, *factors["gate_proj"], plan, 1.0, base=gate_flat).to(gate.dtype)
    us = up_flat.index_select(0, plan.token) if factors["up_proj"] is None else shared_input_lora(
        x_dropped, *factors["up_proj"], plan, 1.0, base=up_flat).to(up.dtype)
    weighted = weighted_gated_activation(gs, us, plan.weight.unsqueeze(-1), layer.base_layer.act_fn)  # (M, I)
    hidden = torch.zeros_like(gate_flat).index_add(0, plan.token, weighted)
    weight_sum = gate_flat.new_zeros(tokens, 1).index_add(0, plan.token, plan.weight.to(gate.dtype).unsqueeze(-1))
    down_delta = None
    if factors["down_proj"] is not None:
        keep = per_row_dropout(torch.ones_like(gate), rows_jobs, dropouts).reshape(tokens, -1)
        pair_delta = grouped_lora(weighted * keep.index_select(0, plan.token), *factors["down_proj"], plan, 1.0)
        down_delta = x.new_zeros(tokens, pair_delta.shape[-1]).index_add(0, plan.token, pair_delta.to(x.dtype))
        down_delta = down_delta.view(batch, seq, -1)
    return hidden.view(gate.shape), down_delta, weight_sum.view(batch, seq, 1)


def _job_table(layer, jobs: list[str], all_jobs: tuple[str, ...], device: torch.device) -> dict:
    """Per-job settings as constant tensors indexed by a job's position in `all_jobs` (the last index: base rows)."""
    sizes = [layer.settings[job].num_experts for job in jobs]
    total = sum(sizes) + 1
    top = {job: top_k_of(layer.settings[job].rule) for job in jobs}
    offsets, allowed, k_of, renorm_of, jitter_of = {}, [], [], [], []
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
        k_of.append(top[job][0] if job in offsets else 1)
        renorm_of.append(top[job][1] if job in offsets else False)
        jitter_of.append(layer.settings[job].jitter_noise if job in offsets else 0.0)
    ranks = [f[0].shape[1] for job in jobs for f in [layer.experts[job].factors(p) for p in PROJECTIONS] if f is not None]
    return {
        "offsets": offsets, "experts": total, "k": max(k_of), "rank": max(ranks, default=0),
        "allowed": constant_on(tuple(allowed), torch.bool, device), "k_of": constant_on(tuple(k_of), torch.int64, device),
        "renormalize_of": constant_on(tuple(renorm_of), torch.bool, device),
        "jitter": any(jitter_of), "jitter_of": constant_on(tuple(jitter_of), torch.float32, device),
    }


def _stacked_factors(layer, jobs: list[str], proj: str, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A (Σ E + 1, r, in), s·B (Σ E + 1, out, r)) of every job's experts on `proj`, zeros for a job without experts
    there and for the null expert; None when no job has experts on `proj`."""
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
    return torch.cat(a_parts), torch.cat(b_parts)


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
        records.append(RouterRecord(layer.layer_name, job, probs[:, columns], selected[:, columns], mask))
