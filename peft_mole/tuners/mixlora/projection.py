"""A single linear projection with its own router and LoRA experts (MoLA / DynMoLE reference style).

    y = W x + Σ_{e∈S(x)} w_e · s·B_e A_e dropout(x)

Used for `router_scope="projection"`, where gate, up and down are each routed separately.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_mole.forward_context import ForwardContext
from peft_mole.ops.experts import (
    delta_sum,
    dense_lora_sum,
    dense_weights,
    dispatch,
    shared_input_lora,
    slot_lora_sum,
    takes_slot_path,
    used_slots,
)
from peft_mole.ops.segmented_lora import scatter_row_deltas
from peft_mole.tuners.mixlora.routed import RoutedExpertsLayer, run_eagerly


class MoELoraLinear(RoutedExpertsLayer):
    """nn.Linear + a router + E LoRA experts per adapter, one adapter per batch row."""

    prefix = "mixlora_"

    def __init__(self, base_layer: nn.Linear, adapter_name: str, context: ForwardContext, layer_name: str) -> None:
        linear = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{layer_name}: {type(self).__name__} wraps nn.Linear, got {type(linear).__name__}")
        super().__init__(base_layer, adapter_name, context, layer_name)

    def update_layer(self, adapter_name: str, *, projections: list[str] | None = None, **settings) -> None:
        if settings.get("use_dora"):
            raise ValueError("use_dora=True is not supported with router_scope='projection'; use router_scope='block'")
        linear = self.get_base_layer()
        self.add_experts(adapter_name, {"proj": linear}, linear.in_features, **settings)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        if self._context.row_jobs is not None:  # a compiled multi-job step: the rows grouped by job, eagerly
            return run_eagerly(self._forward_grouped, x, *args, **kwargs)
        return self._forward_grouped(x, *args, **kwargs)

    def _forward_grouped(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        units = self._context.unit_view(x)
        if units is not x:  # a packed batch: its tokens are grouped by adapter
            out = self._forward_grouped(units, *args, **kwargs)
            return out.view(*x.shape[:-1], out.shape[-1])
        out = self.base_layer(x, *args, **kwargs)
        groups, token_mask = self.row_groups(x)
        batch, hidden = x.shape[0], x.shape[-1]
        if len(groups) == 1 and groups[0].num_rows == batch:
            adapter = groups[0].adapter
            if adapter not in self.routers:
                return out
            mask = None if token_mask is None else token_mask.reshape(-1)
            delta = self._mixture(adapter, x.reshape(-1, hidden), mask).reshape(out.shape)
            return (out + delta).to(out.dtype)  # rounded once, as PEFT's LoRA adds its delta
        masks = {g.adapter: None if token_mask is None else token_mask[g.rows].reshape(-1) for g in groups}

        def delta(adapter: str, rows: torch.Tensor) -> torch.Tensor | None:
            if adapter not in self.routers:
                return None
            delta = self._mixture(adapter, rows.reshape(-1, hidden), masks[adapter])
            return delta.reshape(*rows.shape[:-1], delta.shape[-1])

        return scatter_row_deltas(out, x, groups, delta)

    def _mixture(self, adapter: str, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """Σ_e w_e s·B_e A_e dropout(x) for N tokens x (N, in) → (N, out)."""
        settings = self.settings[adapter]
        weights, chosen = self.route(adapter, x, token_mask)
        lora_a, lora_b = self.experts[adapter].factors("proj")
        dropout_active = self.training and isinstance(self.dropouts[adapter], nn.Dropout)
        if takes_slot_path(x.shape[0]) and not dropout_active:  # decoding: no dispatch
            if settings.selection_varies:  # DynMoLE: slots of weight 0 in every row; top-k slots carry weight
                weights, chosen = used_slots(weights, chosen)
            return slot_lora_sum(x, lora_a, lora_b, chosen, settings.scaling, weights)  # (N, out)
        dense = dense_weights(weights, chosen, settings.num_experts, token_mask)
        if dense is not None:  # most tokens use every expert (DynMoLE broadcasting): no dispatch
            return dense_lora_sum(self.dropouts[adapter](x), lora_a, lora_b, settings.scaling, dense)
        plan = dispatch(weights, chosen, settings.num_experts)
        pair = shared_input_lora(self.dropouts[adapter](x), lora_a, lora_b, plan, settings.scaling)  # (M, out)
        pair = pair * plan.weight.to(pair.dtype).unsqueeze(-1)
        return delta_sum(pair, plan.token, x)
