"""The MixLoRA MLP block: frozen gated MLP + router + LoRA experts (MixLoRA §3, SPEC.md §1).

For a token x routed to experts S with weights w:
    y = Σ_{e∈S} w_e FFN_e(x),  FFN_e(x) = W2_e(σ(W1_e x) ⊙ W3_e x),  W_e = W + s·B_e A_e.
Computed with the frozen weights once per token:
    g = W1 x, u = W3 x                                   (shared by all experts)
    h_e = σ(g + s·B1_e A1_e x) ⊙ (u + s·B3_e A3_e x)     (only the LoRA parts per expert)
    y = W2 (Σ_e w_e h_e) + Σ_e s·B2_e A2_e (w_e h_e)     (W2 is linear: it runs once on the weighted sum)
(+ b2·Σ_e w_e when the down projection has a bias), so the block costs about one dense MLP plus k LoRA products
per token, where the references run the frozen weights once per selected expert.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_mole.forward_context import BASE_ROW, ForwardContext
from peft_mole.ops.dense_mixture import dense_gated_mixture
from peft_mole.ops.experts import (
    SMALL_PAIRS,
    delta_sum,
    dense_a,
    dense_b_sum,
    dense_weights,
    dispatch,
    grouped_lora,
    pair_a,
    segment_b,
    shared_input_lora,
    slot_lora,
    slot_lora_sum,
    slot_rows,
    takes_slot_path,
    used_slots,
)
from peft_mole.ops.gated import weighted_gated_activation
from peft_mole.ops.pair_mixture import pair_gated_mixture
from peft_mole.ops.profiling import profiled
from peft_mole.ops.segmented_lora import consecutive_slices
from peft_mole.tuners.mixlora.per_row import per_row_mixture, top_k_of
from peft_mole.tuners.mixlora.routed import RoutedExpertsLayer, run_eagerly
from peft_mole.tuners.mixlora.targets import find_gated_mlp, is_quantised, plain_linear


class MixLoRAMLP(RoutedExpertsLayer):
    """A gated decoder MLP whose tokens are routed to LoRA experts, one adapter (router + experts) per row."""

    prefix = "mixlora_"
    layer_checkpointed = False  # its decoder layer is activation-checkpointed (`MultiJobModel.compile_mixed_steps`)

    def __init__(self, base_layer: nn.Module, adapter_name: str, context: ForwardContext, layer_name: str) -> None:
        if not find_gated_mlp(base_layer):
            raise TypeError(
                f"{layer_name}: {type(self).__name__} needs a gated MLP (linear gate_proj, up_proj, down_proj and "
                f"act_fn), got {type(base_layer).__name__}"
            )
        super().__init__(base_layer, adapter_name, context, layer_name)

    def update_layer(self, adapter_name: str, *, projections: list[str], **settings) -> None:
        """Add adapter `adapter_name` with experts on the MLP projections named in `projections`."""
        linears = {proj: plain_linear(getattr(self.base_layer, proj)) for proj in projections}
        self.add_experts(adapter_name, linears, plain_linear(self.base_layer.gate_proj).in_features, **settings)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        if self._context.row_jobs is not None and x.dim() == 3:  # a compiled multi-job step: the mix is data
            if self._per_row_serves():
                return self._forward_per_row(x)  # (before `unit_view`, whose packed-batch check reads the mix)
            # DynMoLE jobs (a data-dependent number of experts) or DoRA experts: the rows grouped by job, eagerly
            return run_eagerly(self._forward_grouped, x, *args, **kwargs)
        return self._forward_grouped(x, *args, **kwargs)

    def _per_row_serves(self) -> bool:
        """Whether the per-row block (`tuners.mixlora.per_row`) takes every routed job of this block: top-k rules
        without DoRA experts. Read while tracing: the jobs' settings are constants of the compiled graph."""
        return all(top_k_of(self.settings[job].rule) is not None and not self.experts[job].use_dora
                   for job in self._context.jobs if job in self.routers)

    def _forward_grouped(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The block with the rows grouped by adapter in Python (one adapter per row, or per token of a packed row)."""
        units = self._context.unit_view(x)
        if units is not x:  # a packed batch: its tokens are grouped by adapter
            out = self._forward_grouped(units, *args, **kwargs)
            return out.view(*x.shape[:-1], out.shape[-1])
        mlp = self.base_layer
        batch, hidden_size = x.shape[0], x.shape[-1]
        groups, token_mask = self.row_groups(x)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)  # (B, T, I), shared by every expert

        if len(groups) == 1 and groups[0].num_rows == batch:
            adapter = groups[0].adapter
            if adapter not in self.routers:
                return mlp.down_proj(mlp.act_fn(gate) * up)
            mask = None if token_mask is None else token_mask.reshape(-1)
            hidden, down_delta, weight_sum = self._mixture(
                adapter, x.reshape(-1, hidden_size), gate.reshape(-1, gate.shape[-1]),
                up.reshape(-1, up.shape[-1]), mask,
            )
            out = self._down(hidden, down_delta, weight_sum, x.dtype)
            return out.reshape(*x.shape[:-1], out.shape[-1])

        consecutive = consecutive_slices(groups, batch)
        if consecutive:  # split/cat keep the backward to one buffer (see ops.segmented_lora)
            sizes = [g.num_rows for g in groups]
            pieces = zip(groups, x.split(sizes), gate.split(sizes), up.split(sizes), strict=True)
        else:
            pieces = ((g, x[g.rows], gate[g.rows], up[g.rows]) for g in groups)
        results = []  # per group: (hidden (rows, T, I), down delta (rows, T, d) or None, Σ w (rows, T, 1) or None)
        for group, xr, gr, ur in pieces:
            if group.adapter == BASE_ROW or group.adapter not in self.routers:
                results.append((mlp.act_fn(gr) * ur, None, None))
                continue
            mask = None if token_mask is None else token_mask[group.rows].reshape(-1)
            h, d, w = self._mixture(
                group.adapter, xr.reshape(-1, hidden_size), gr.reshape(-1, gr.shape[-1]),
                ur.reshape(-1, ur.shape[-1]), mask,
            )
            results.append((
                gr.new_zeros(gr.shape) if h is None else h.reshape(gr.shape),
                None if d is None else d.reshape(*gr.shape[:-1], d.shape[-1]),
                w.reshape(*gr.shape[:-1], 1),
            ))
        out_features = plain_linear(mlp.down_proj).out_features
        any_delta = any(d is not None for _, d, _ in results)
        if consecutive:
            hidden = torch.cat([h for h, _, _ in results])
            weight_sum = torch.cat([
                w if w is not None else h.new_ones(*h.shape[:-1], 1) for h, _, w in results
            ])
            down_delta = torch.cat([
                d if d is not None else h.new_zeros(*h.shape[:-1], out_features) for h, d, _ in results
            ]) if any_delta else None
        else:
            hidden = torch.zeros_like(gate)
            weight_sum = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
            delta_dtype = functools.reduce(torch.promote_types, [d.dtype for _, d, _ in results if d is not None],
                                           x.dtype)
            down_delta = torch.zeros(*x.shape[:-1], out_features, dtype=delta_dtype, device=x.device) if any_delta \
                else None
            for group, (h, d, w) in zip(groups, results, strict=True):  # dtypes differ under CPU autocast
                hidden[group.rows] = h.to(hidden.dtype)
                if w is not None:
                    weight_sum[group.rows] = w.to(weight_sum.dtype)
                if d is not None:
                    down_delta[group.rows] = d.to(down_delta.dtype)
        return self._down(hidden, down_delta, weight_sum, x.dtype, whole_batch=True)

    def _forward_per_row(self, x: torch.Tensor) -> torch.Tensor:
        """The block with one job index per row (`tuners.mixlora.per_row`): one graph for every mix of jobs."""
        mlp = self.base_layer
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if not any(job in self.routers for job in self._context.jobs):
            return mlp.down_proj(mlp.act_fn(gate) * up)
        token_mask = self._context.tokens_to_record(x.shape[0], x.shape[1])
        hidden, down_delta, weight_sum = per_row_mixture(self, x, gate, up, token_mask)
        return self._down(hidden, down_delta, weight_sum, x.dtype, whole_batch=True)

    def _down(
        self,
        hidden: torch.Tensor | None,
        down_delta: torch.Tensor | None,
        weight_sum: torch.Tensor,
        input_dtype: torch.dtype,
        whole_batch: bool = False,
    ) -> torch.Tensor:
        """W2 h + Σ_e s·B2_e A2_e(w_e h_e) + b2·Σ_e w_e: the frozen down projection once per token.

        `hidden` is None when the down experts are DoRA: then `down_delta` already holds the whole projection.
        Otherwise `down_delta` is in the experts' dtype at least (fp32 adapters on a bf16 base: fp32) and the sum
        W2 h + delta is rounded once, to the output's dtype (the wider of W2 h's and the block input's), as PEFT's
        LoRA adds its delta; every path (decoding's slots, pairs, dense) sums the deltas alike.
        With `whole_batch` (hidden is (batch, seq, I)) and a down projection wrapped by another adapter's LoRA
        (multi-job training), the wrapper runs, so rows of that adapter get their LoRA delta.
        """
        down = self.base_layer.down_proj
        quantised = is_quantised(plain_linear(down).weight)
        if hidden is not None and ((whole_batch and isinstance(down, BaseTunerLayer)) or quantised):
            # the module, not its weight: another adapter's LoRA wrapper (multi-job training) gives its rows their
            # delta; a quantised linear (bitsandbytes) dequantises inside. W2 still runs once on the weighted sum.
            module = down if whole_batch else plain_linear(down)
            out = module(hidden)  # W2 h + b2
            if down.bias is not None:
                out = out + down.bias * (weight_sum - 1)
            return out if down_delta is None else _plus_delta(out, down_delta, input_dtype)
        out = down_delta if hidden is None else F.linear(hidden, down.weight)
        if down.bias is not None:
            out = out + down.bias * weight_sum
        return out if (down_delta is None or hidden is None) else _plus_delta(out, down_delta, input_dtype)

    def _mixture(
        self,
        adapter: str,
        x: torch.Tensor,
        gate: torch.Tensor,
        up: torch.Tensor,
        token_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Route N tokens of one adapter and mix its experts.

        Args:
            x: (N, d) tokens; gate, up: (N, I) frozen W1 x and W3 x; token_mask: (N,) real tokens or None.
        Returns:
            hidden Σ_e w_e h_e (N, I) (None with DoRA down experts), the summed down-projection deltas (N, d) or
            None, and Σ_e w_e (N, 1).
        """
        settings = self.settings[adapter]
        weights, chosen = self.route(adapter, x, token_mask)  # (N, k) each
        dropout_active = self.training and isinstance(self.dropouts[adapter], nn.Dropout)
        if takes_slot_path(x.shape[0]) and not dropout_active:
            return self._mixture_few_tokens(adapter, x, gate, up, weights, chosen)
        if settings.selection_varies and torch.compiler.is_compiling():
            return run_eagerly(self._mixture_selected, adapter, x, gate, up, weights, chosen, token_mask)
        return self._mixture_selected(adapter, x, gate, up, weights, chosen, token_mask)

    def _mixture_selected(self, adapter, x, gate, up, weights, chosen, token_mask):
        """`_mixture` for many tokens: every pair (dense) when nearly all are selected, else dispatch.

        A rule whose number of experts per token depends on the data (DynMoLE) runs this eagerly inside a
        compiled model (one graph break per MoE layer): compiled, the choice would have to be made from shapes
        alone, i.e. always dense, which costs the at-initialisation step at every step (docs/performance.md,
        "torch.compile")."""
        settings = self.settings[adapter]
        dense = None if self.experts[adapter].use_dora else dense_weights(
            weights, chosen, settings.num_experts, token_mask
        )
        if dense is not None:
            return self._mixture_dense(adapter, x, gate, up, dense)
        plan = dispatch(weights, chosen, settings.num_experts)
        if not self.experts[adapter].use_dora and self.experts[adapter].factors("down_proj") is not None and (
            len(plan.token) > SMALL_PAIRS and plan.counts is not None  # compiled: the step-by-step ops, fused
        ):
            return self._mixture_pairs(adapter, x, gate, up, plan)
        weighted = self._gate_up_experts(adapter, x, gate, up, plan)  # (M, I): w_e h_e per pair
        down_delta, down_replaces_hidden = self._down_experts(adapter, x, gate, weighted, plan)
        hidden, weight_sum = self._combine(weighted, plan, gate, with_hidden=not down_replaces_hidden)
        return hidden, down_delta, weight_sum

    @profiled("peft_mole::experts_few_tokens")
    def _mixture_few_tokens(self, adapter, x, gate, up, weights, chosen):
        """`_mixture` for a few tokens (decoding) without dispatch: each token's k slots side by side, (N, k, ·).

        Same formula, DoRA included. No active dropout (the caller checks), so the experts see x itself. Decoding
        pays this per layer and token: each operator here costs about as much as the rank-r products."""
        settings, experts, mlp = self.settings[adapter], self.experts[adapter], self.base_layer
        if settings.selection_varies:  # DynMoLE: slots of weight 0 in every row; top-k slots carry weight
            weights, chosen = used_slots(weights, chosen)
        k = chosen.shape[1]
        w = weights.to(gate.dtype).unsqueeze(-1)  # (N, k, 1)
        rows = slot_rows(chosen)  # gate and up share their input x
        slots = {}
        for proj, frozen in (("gate_proj", gate), ("up_proj", up)):
            factors = experts.factors(proj)
            shared = frozen.unsqueeze(1)  # (N, 1, I): W x, the same for every slot
            if factors is None:
                slots[proj] = shared.expand(-1, k, -1)
                continue
            delta = slot_lora(x, *factors, chosen, settings.scaling, rows)  # adapter dtype: one rounding, as pairs
            pre = (shared.to(delta.dtype) + delta).to(frozen.dtype)
            if experts.use_dora:
                linear = getattr(mlp, proj)
                pre = _dora_rescale(pre, experts.dora_scale(proj, linear.weight), chosen, linear.bias)
            slots[proj] = pre
        weighted = mlp.act_fn(slots["gate_proj"]) * slots["up_proj"] * w  # (N, k, I): w_e h_e
        down_factors = experts.factors("down_proj")
        if down_factors is None:
            return weighted.sum(1), None, w.sum(1)
        if not experts.use_dora:
            down_delta = slot_lora_sum(weighted, *down_factors, chosen, settings.scaling)  # rounded in `_down`
            return weighted.sum(1), down_delta, w.sum(1)
        # DoRA down experts: each slot's whole projection c_e ⊙ (W2 + s·B2_e A2_e)(w_e h_e), summed over the slots
        scale = experts.dora_scale("down_proj", mlp.down_proj.weight)
        per_slot = F.linear(weighted, mlp.down_proj.weight) + slot_lora(weighted, *down_factors, chosen,
                                                                          settings.scaling).to(x.dtype)
        return None, (per_slot * scale[chosen].to(x.dtype)).sum(1), w.sum(1)

    @profiled("peft_mole::experts_dense")
    def _mixture_dense(self, adapter, x, gate, up, weights):
        """`_mixture` when (almost) every token selects every expert (DynMoLE broadcasting): every pair computed
        expert-major, (E, N, ·), with no dispatch; the combine is a sum over experts and unselected pairs weigh 0.

        Same formula and dropout masks as the dispatch path; no DoRA (the caller checks).
        Args:
            weights: (N, E) routing weights in expert order.
        """
        settings, experts, mlp = self.settings[adapter], self.experts[adapter], self.base_layer
        dropout = self.dropouts[adapter]
        x_dropped = dropout(x)
        expert_weights = weights.t().unsqueeze(-1)  # (E, N, 1)
        loras = {}  # (A_e x (E, N, r), B_e) per projection with experts
        for proj in ("gate_proj", "up_proj"):
            factors = experts.factors(proj)
            loras[proj] = None if factors is None else (dense_a(x_dropped, factors[0]), factors[1])
        down_factors = experts.factors("down_proj")
        mask = None
        if down_factors is None:  # no down experts: A2 with rank 0, so z2 is empty and only Σ_e w_e h_e is wanted
            adapter_dtype = next(experts.parameters()).dtype
            lora_a = gate.new_zeros(settings.num_experts, 0, gate.shape[-1], dtype=adapter_dtype)
        else:
            lora_a = down_factors[0]
            if isinstance(dropout, nn.Dropout) and self.training:
                mask = dropout(torch.ones_like(gate))  # (N, I): 0 or 1 / (1 - p) per token, shared by its experts
        hidden, z = dense_gated_mixture(  # Σ_e w_e h_e (N, I) and A2_e(m ⊙ w_e h_e) (E, N, r), blockwise
            gate, up, expert_weights, mlp.act_fn, lora_a, mask, loras["gate_proj"], loras["up_proj"], settings.scaling
        )
        down_delta = None
        if down_factors is not None:
            down_delta = dense_b_sum(z.transpose(0, 1), down_factors[1], settings.scaling)  # rounded in `_down`
        return hidden, down_delta, weights.sum(1, keepdim=True).to(gate.dtype)

    @profiled("peft_mole::experts_pairs")
    def _mixture_pairs(self, adapter, x, gate, up, plan):
        """`_mixture` on dispatched pairs with down experts and no DoRA: from the frozen W1 x, W3 x to Σ_e w_e h_e
        and the down experts' A2 products in one blockwise function (`ops.pair_mixture`), which keeps nothing of
        size (pairs, I) for the backward. Same formula, dropout masks and order of draws as the step-by-step path
        (`_gate_up_experts`, `_down_experts`), which serves DoRA and blocks without down experts."""
        settings, experts, mlp = self.settings[adapter], self.experts[adapter], self.base_layer
        dropout = self.dropouts[adapter]
        x_dropped = dropout(x)
        loras = {}  # (s·A_e x_t per pair (M, r), B_e) per projection with experts
        for proj in ("gate_proj", "up_proj"):
            factors = experts.factors(proj)
            loras[proj] = None if factors is None else (pair_a(x_dropped, factors[0], plan) * settings.scaling,
                                                        factors[1])
        mask = None
        if isinstance(dropout, nn.Dropout) and self.training:
            mask = dropout(torch.ones_like(gate))  # (N, I): 0 or 1 / (1 - p) per token, shared by its experts
        lora_a, lora_b = experts.factors("down_proj")
        hidden, z = pair_gated_mixture(
            gate, up, plan.weight, mlp.act_fn, lora_a, plan.token, plan.counts, mask, loras["gate_proj"],
            loras["up_proj"],
        )
        pair_delta = segment_b(z, lora_b, plan, settings.scaling)  # summed in fp32 at least, rounded in `_down`
        down = delta_sum(pair_delta, plan.token, x)
        _, weight_sum = self._combine(None, plan, gate, with_hidden=False)
        return hidden, down, weight_sum

    @profiled("peft_mole::experts_gate_up")
    def _gate_up_experts(self, adapter, x, gate, up, plan) -> torch.Tensor:
        """w_e · σ(g + s·B1_e A1_e x) ⊙ (u + s·B3_e A3_e x) for every selected pair (t, e), (M, I)."""
        settings, experts, mlp = self.settings[adapter], self.experts[adapter], self.base_layer
        # Dropout masks are drawn per token and shared by its experts (same marginal as per-expert masks,
        # k times fewer random draws); gate and up share the mask on x, as they share x.
        x_dropped = self.dropouts[adapter](x)
        gate_factors, up_factors = experts.factors("gate_proj"), experts.factors("up_proj")
        # (M, I) per pair: frozen W1 x (W3 x) of the pair's token, plus its expert's LoRA when there is one
        if gate_factors is not None:
            gs = shared_input_lora(x_dropped, *gate_factors, plan, settings.scaling, base=gate).to(gate.dtype)
        else:
            gs = gate.index_select(0, plan.token)
        if up_factors is not None:
            us = shared_input_lora(x_dropped, *up_factors, plan, settings.scaling, base=up).to(up.dtype)
        else:
            us = up.index_select(0, plan.token)
        gs = _dora_rescale(gs, experts.dora_scale("gate_proj", mlp.gate_proj.weight), plan.expert,
                            mlp.gate_proj.bias)
        us = _dora_rescale(us, experts.dora_scale("up_proj", mlp.up_proj.weight), plan.expert, mlp.up_proj.bias)
        return weighted_gated_activation(gs, us, plan.weight.unsqueeze(-1), mlp.act_fn)  # w_e h_e per pair

    @profiled("peft_mole::combine")
    def _combine(self, weighted, plan, gate, with_hidden: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Σ_e w_e h_e per token (N, I) (None when not wanted: DoRA down experts) and Σ_e w_e (N, 1)."""
        hidden = torch.zeros_like(gate).index_add(0, plan.token, weighted) if with_hidden else None
        weight_sum = gate.new_zeros(gate.shape[0], 1)
        return hidden, weight_sum.index_add(0, plan.token, plan.weight.to(gate.dtype).unsqueeze(-1))

    @profiled("peft_mole::experts_down")
    def _down_experts(self, adapter, x, gate, weighted, plan) -> tuple[torch.Tensor | None, bool]:
        """Σ_e s·B2_e A2_e (w_e h_e) per token (N, d), or None without down experts.

        With DoRA down experts the result is the whole projection Σ_e c_e ⊙ (W2 + s·B2_e A2_e)(w_e h_e) (W2 runs
        per pair, as each expert rescales its own output) and the second value is True.
        """
        settings, experts, mlp = self.settings[adapter], self.experts[adapter], self.base_layer
        dropout = self.dropouts[adapter]
        factors = experts.factors("down_proj")
        if factors is None:
            return None, False
        down_input = weighted
        if isinstance(dropout, nn.Dropout) and self.training:
            keep = dropout(torch.ones_like(gate[:, :1].expand_as(gate)))  # (N, I) mask / (1 - p), per token
            down_input = weighted * keep.index_select(0, plan.token)
        pair_delta = grouped_lora(down_input, *factors, plan, settings.scaling)
        scale = experts.dora_scale("down_proj", mlp.down_proj.weight)
        if scale is not None:  # DoRA: each pair's whole projection
            pair_delta = F.linear(weighted, mlp.down_proj.weight) + pair_delta.to(x.dtype)
            pair_delta = pair_delta * scale.index_select(0, plan.expert).to(x.dtype)
        return delta_sum(pair_delta, plan.token, x), scale is not None  # (fp32 at least: rounded in `_down`)


def _plus_delta(out: torch.Tensor, delta: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
    """out + delta rounded once, to the wider of out's and the block input's dtype (fp32 under CPU autocast, as
    before the deltas kept their own dtype)."""
    return (out + delta).to(torch.promote_types(out.dtype, input_dtype))


def _dora_rescale(
    outputs: torch.Tensor, scale: torch.Tensor | None, experts: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """DoRA on per-pair or per-slot outputs: c_e ⊙ (W + s·B_e A_e) x + b — the magnitude scale leaves the bias alone.

    `experts`: the expert of each output row, (M,) for pairs (M, out) or (N, k) for slots (N, k, out)."""
    if scale is None:
        return outputs
    scale = scale[experts].to(outputs.dtype)
    return outputs * scale if bias is None else (outputs - bias) * scale + bias
