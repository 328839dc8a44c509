"""What every routed-experts layer shares: per-adapter routers, experts, dropout and settings, the routing step
and the recording of router statistics. Subclasses (the MLP block, the single projection) add the forward.

Container names carry the tuner's prefix (`mixlora_router`, `dynmole_router`, ...), as PEFT expects: a subclass
only sets `prefix`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_mole import routing
from peft_mole.finite_check import raise_if_not_finite
from peft_mole.forward_context import ForwardContext, RouterRecord, RowGroup
from peft_mole.ops.dropout import Dropout
from peft_mole.ops.job_streams import jitter
from peft_mole.ops.profiling import profiled
from peft_mole.tuners.mixlora.experts import ExpertLoRA
from peft_mole.tuners.mixlora.targets import adapter_dtype

RoutingRule = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.compiler.disable
def run_eagerly(fn, *args, **kwargs):
    """fn(*args, **kwargs) outside any compiled graph (Dynamo breaks the graph around the call)."""
    return fn(*args, **kwargs)


@dataclass
class ExpertSettings:
    """Per-adapter, non-learned settings of a routed-experts layer."""

    num_experts: int
    scaling: float
    jitter_noise: float
    rule: RoutingRule
    selection_varies: bool = False  # the rule picks a data-dependent number of experts per token (DynMoLE)
    jitter_stream: int = 0  # the random stream its jitter draws from (`ops.job_streams`; 0: torch's default)


class RoutedExpertsLayer(nn.Module, BaseTunerLayer):
    """Base of the layers whose tokens a router sends to LoRA experts, one adapter per batch row."""

    prefix = "mixlora_"
    adapter_layer_names = ("mixlora_router", "mixlora_experts")
    other_param_names = ("mixlora_settings", "mixlora_dropout")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.adapter_layer_names = (cls.prefix + "router", cls.prefix + "experts")
        cls.other_param_names = (cls.prefix + "settings", cls.prefix + "dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, context: ForwardContext, layer_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        setattr(self, self.prefix + "router", nn.ModuleDict())
        setattr(self, self.prefix + "experts", nn.ModuleDict())
        setattr(self, self.prefix + "dropout", nn.ModuleDict())
        setattr(self, self.prefix + "settings", {})
        self.layer_name = layer_name
        self._context = context
        self._active_adapter = adapter_name
        self.merged_adapters = []

    @property
    def routers(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "router")

    @property
    def experts(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "experts")

    @property
    def dropouts(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "dropout")

    @property
    def settings(self) -> dict[str, ExpertSettings]:
        return getattr(self, self.prefix + "settings")

    def add_experts(
        self,
        adapter_name: str,
        linears: dict[str, nn.Linear],
        router_in_features: int,
        *,
        num_experts: int,
        r: int,
        scaling: float,
        dropout: float,
        rule: RoutingRule,
        router_init_std: float,
        jitter_noise: float,
        use_dora: bool,
        selection_varies: bool = False,
    ) -> None:
        """Add adapter `adapter_name`: an fp32 router N(0, std²) on inputs of size `router_in_features` and E
        LoRA/DoRA experts on `linears`."""
        device = next(iter(linears.values())).weight.device
        router = nn.Linear(router_in_features, num_experts, bias=False, device=device, dtype=torch.float32)
        nn.init.normal_(router.weight, mean=0.0, std=router_init_std)
        self.routers[adapter_name] = router
        self.experts[adapter_name] = ExpertLoRA(linears, num_experts, r, scaling, use_dora)
        self.dropouts[adapter_name] = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.settings[adapter_name] = ExpertSettings(num_experts, scaling, jitter_noise, rule, selection_varies)
        self.set_adapter(self.active_adapters)

    def _router_probabilities(self, adapter: str, router_input: torch.Tensor) -> torch.Tensor:
        logits = F.linear(router_input, self.routers[adapter].weight.float())  # (N, E)
        if self._context.check_finite:
            raise_if_not_finite(logits, f"the router logits of {self.layer_name} (adapter {adapter!r})")
        return routing.router_probabilities(logits)

    @profiled("peft_mole::route")
    def route(
        self, adapter: str, x: torch.Tensor, token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities p = softmax(W_g x) in fp32 and the adapter's rule → (weights, experts).

        Records (p, selection) for the aux loss and diagnostics when the tuner is recording.
        Args:
            x: (N, d) tokens; token_mask: (N,) real tokens, or None.
        """
        settings = self.settings[adapter]
        router_input = x.float()
        if self.training and settings.jitter_noise > 0:
            eps = settings.jitter_noise
            if settings.jitter_stream:  # a multi-job job's own stream, over its rows' own width
                noise = jitter(router_input.shape, eps, router_input.device, settings.jitter_stream)
            else:
                noise = torch.empty_like(router_input).uniform_(1.0 - eps, 1.0 + eps)
            router_input = router_input * noise
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):  # fp32 router even under bf16/fp16 autocast
                probs = self._router_probabilities(adapter, router_input)
        else:
            probs = self._router_probabilities(adapter, router_input)
        weights, chosen = settings.rule(probs)
        records = self._context.records
        if records is not None:
            # No autograd op here: checkpointed layers re-run without recording and must save the same tensors.
            with torch.no_grad():
                selected = routing.selection_mask(chosen, weights, settings.num_experts)
            records.append(RouterRecord(self.layer_name, adapter, probs, selected, token_mask))
        return weights, chosen

    def row_groups(self, x: torch.Tensor) -> tuple[list[RowGroup], torch.Tensor | None]:
        """The batch's row groups and the (batch, seq) mask of tokens whose statistics count."""
        batch, hidden_size = x.shape[0], x.shape[-1]
        groups = self._context.row_groups(batch, self.active_adapters, x.device)
        token_mask = self._context.tokens_to_record(batch, x[0].numel() // hidden_size) if x.dim() == 3 else None
        return groups, token_mask

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move this adapter's router and experts to the frozen weights' device, keeping their dtypes (the router
        stays fp32). PEFT calls this after loading with `low_cpu_mem_usage=True`."""
        if device is None:
            device = next(p.device for p in self.base_layer.parameters())
        for container in (self.routers, self.experts):
            if adapter_name in container:
                container[adapter_name].to(device)

    def cast_to_creation_dtype(self, adapter_name: str) -> None:
        """This adapter's experts in the dtype `add_experts` makes them (the frozen weights'; fp32 when quantised);
        the router stays fp32."""
        if adapter_name in self.experts:
            self.experts[adapter_name].to(adapter_dtype(next(self.base_layer.parameters())))

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(
            "Routed LoRA experts cannot be merged into the base weights: each token uses different experts, "
            "chosen by the router at run time. Use unload() to get the base model back, or keep the adapter."
        )

    def unmerge(self) -> None:
        """Nothing is ever merged (`merge` refuses); as PEFT's LoRA layers do when unmerged, warn and return."""
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)

    def __repr__(self) -> str:
        return f"{self.prefix.rstrip('_')}.{super().__repr__()}"
