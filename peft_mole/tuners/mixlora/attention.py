"""Plain LoRA on attention projections, with several adapters and one adapter per batch row."""

from __future__ import annotations

import math
import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_mole.forward_context import ForwardContext
from peft_mole.ops.dropout import Dropout
from peft_mole.ops.indexed_lora import indexed_lora_delta, packed_lora_delta
from peft_mole.ops.segmented_lora import LoraFactors, add_delta, lora_delta, scatter_row_deltas
from peft_mole.tuners.mixlora.targets import adapter_dtype


class LoraFactor(nn.Module):
    """One adapter's LoRA factor, held as `weight`: its parameter is named `<prefix>A.<adapter>.weight`, as PEFT's
    LoRA names `lora_A.<adapter>.weight`. Code that finds an adapter's parameters by name relies on that: TRL's
    DPO/KTO/GRPO/RLOO trainers copy an adapter into their frozen reference adapter by replacing ".default." in the
    names, and a name ending in ".default" was left out (the reference kept an untrained attention LoRA). Saved
    files keep the key `<prefix>A` (the tuner's `_get_adapter_state_dict` / `_remap_adapter_state_dict_for_load`,
    as PEFT's LoRA keeps DoRA's `lora_magnitude_vector`)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}"


def factor_key_with_weight(key: str, prefix: str) -> str:
    """A saved attention-LoRA key (`...q_proj.mixlora_A`, the format since the first release) as the parameter's
    name without the adapter (`...q_proj.mixlora_A.weight`); other keys unchanged."""
    return f"{key}.weight" if key.endswith((f".{prefix}A", f".{prefix}B")) else key


def factor_key_without_weight(key: str, prefix: str, adapter: str) -> str:
    """The inverse for a model key: `...q_proj.mixlora_A.<adapter>.weight` → `...q_proj.mixlora_A.<adapter>`."""
    factors = (f".{prefix}A.{adapter}.weight", f".{prefix}B.{adapter}.weight")
    return key[: -len(".weight")] if key.endswith(factors) else key


class LoraLinear(nn.Module, BaseTunerLayer):
    """y = W x + s · B_a A_a dropout(x) for the adapter a of each row (Hu et al. 2021).

    Parameters live in `<prefix>A[adapter].weight` (r, in) and `<prefix>B[adapter].weight` (out, r) (`LoraFactor`);
    B starts at zero. In saved files their keys are `<prefix>A` and `<prefix>B`.
    """

    prefix = "mixlora_"
    adapter_layer_names = ("mixlora_A", "mixlora_B")
    other_param_names = ("mixlora_scaling", "mixlora_dropout")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.adapter_layer_names = (cls.prefix + "A", cls.prefix + "B")
        cls.other_param_names = (cls.prefix + "scaling", cls.prefix + "dropout")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, context: ForwardContext) -> None:
        super().__init__()
        linear = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoraLinear wraps nn.Linear (or a tuner layer around one), got {type(linear).__name__}")
        self.base_layer = base_layer
        setattr(self, self.prefix + "A", nn.ModuleDict())
        setattr(self, self.prefix + "B", nn.ModuleDict())
        setattr(self, self.prefix + "dropout", nn.ModuleDict())
        setattr(self, self.prefix + "scaling", {})
        self._context = context
        self._active_adapter = adapter_name
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, r: int, scaling: float, dropout: float) -> None:
        """Add adapter `adapter_name` with A ~ Kaiming-uniform and B = 0, drawn as PEFT's LoRA draws them (an
        `nn.Linear` for A and one for B, then A drawn again), so that after the same seed a LoRA job starts as
        PEFT's LoRA adapter."""
        linear = self.get_base_layer()
        weight = linear.weight
        lora_a = nn.Linear(linear.in_features, r, bias=False).weight.detach()
        nn.Linear(r, linear.out_features, bias=False)  # (B's draw, which PEFT then sets to 0)
        if not lora_a.is_meta:  # (meta: PEFT's low_cpu_mem_usage, the values come from the file loaded next)
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            lora_a = lora_a.to(weight.device)
        lora_b = torch.zeros(linear.out_features, r, device=weight.device, dtype=torch.float32)
        dtype = adapter_dtype(weight)
        getattr(self, self.prefix + "A")[adapter_name] = LoraFactor(nn.Parameter(lora_a.to(dtype)))
        getattr(self, self.prefix + "B")[adapter_name] = LoraFactor(nn.Parameter(lora_b.to(dtype)))
        getattr(self, self.prefix + "dropout")[adapter_name] = Dropout(dropout) if dropout > 0 else nn.Identity()
        getattr(self, self.prefix + "scaling")[adapter_name] = scaling
        self.set_adapter(self.active_adapters)

    def _factors(self, adapter: str) -> LoraFactors | None:
        # Called per adapter, projection and forward (a multi-job step: jobs × 7 projections × layers), so it reads
        # the containers' own dicts: through `getattr` and `ModuleDict.__getitem__` the lookups cost more than
        # the rank-r products of a short row (docs/performance-multijob.md, "Host time of a multi-job step").
        (a_name, b_name), (scaling_name, dropout_name) = self.adapter_layer_names, self.other_param_names
        factor_a = self._modules[a_name]._modules.get(adapter)
        if factor_a is None:
            return None
        factor_b = self._modules[b_name]._modules[adapter]
        return LoraFactors(factor_a._parameters["weight"], factor_b._parameters["weight"],
                           getattr(self, scaling_name)[adapter], self._modules[dropout_name]._modules[adapter])

    def _delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        found = self._factors(adapter)
        return None if found is None else lora_delta(x, found.lora_a, found.lora_b, found.scaling, found.dropout)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or not self.active_adapters:
            return out
        context = self._context
        if context.row_jobs is not None:  # a compiled multi-job step: the jobs of the rows (or tokens) as a tensor
            factors = [self._factors(job) for job in context.jobs]
            if context.segments is not None:
                delta = packed_lora_delta(x, context.row_jobs, context.segments, factors)
            else:
                delta = indexed_lora_delta(x, context.row_jobs, factors)
            return out if delta is None else add_delta(out, delta)  # (rounded once, as the eager path)
        units = self._context.unit_view(x)
        if units is not x:  # a packed batch: its tokens are grouped by adapter
            return self._add_deltas(out.view(*units.shape[:-1], out.shape[-1]), units).view(out.shape)
        return self._add_deltas(out, x)

    def _add_deltas(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        groups = self._context.row_groups(x.shape[0], self.active_adapters, x.device)
        return scatter_row_deltas(out, x, groups, self._delta, self._factors)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move this adapter's factors to the frozen weight's device, keeping their dtype, as the routed layers do.
        PEFT calls this after a `low_cpu_mem_usage=True` load, and its own version also cast them to the base's
        dtype: a bf16 base's load rounded the file's fp32 factors before `autocast_adapter_dtype` made them fp32
        again (logits 4e-3 off; found by a review, 2026-12-08)."""
        device = device if device is not None else self.get_base_layer().weight.device
        for name in self.adapter_layer_names:
            if adapter_name in getattr(self, name):
                getattr(self, name)[adapter_name].to(device)

    def cast_to_creation_dtype(self, adapter_name: str) -> None:
        """This adapter's factors in the dtype `update_layer` makes them (the frozen weight's; fp32 when quantised)."""
        dtype = adapter_dtype(self.get_base_layer().weight)
        for name in self.adapter_layer_names:
            if adapter_name in getattr(self, name):
                getattr(self, name)[adapter_name].to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(
            "peft-mole adapters cannot be merged: the expert LoRA in the MLP is chosen per token by the router. "
            "Use unload() to get the base model back, or keep the adapter separate."
        )

    def unmerge(self) -> None:
        """Nothing is ever merged (`merge` refuses); as PEFT's LoRA layers do when unmerged, warn and return."""
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)

    def __repr__(self) -> str:
        return f"{self.prefix.rstrip('_')}.{super().__repr__()}"
