"""Fields and validation shared by every routed-experts adapter config (MixLoRA, DynMoLE)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from peft import PeftConfig

from peft_mole import routing
from peft_mole.registration import add_peft_type
from peft_mole.tuners.load_checks import (
    PICKLE_NAME,
    SAFETENSORS_NAME,
    check_complete_factors,
    check_saved_keys,
    check_weights_file,
)

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# set on a config whose `base_model_shape` a new adapter recorded (not read from a saved adapter's file): another
# new adapter made from it records its own base instead of checking against the first one's
SHAPE_RECORDED = "_base_model_shape_recorded"


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def _check_float(name: str, value, low: float, high: float | None = None, high_open: bool = False,
                 low_open: bool = False) -> None:
    """A finite number in [low, high] (`low_open`/`high_open`: that end excluded); the error names the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    too_high = high is not None and (value >= high if high_open else value > high)
    too_low = value <= low if low_open else value < low
    if too_low or too_high:
        start, end = "(" if low_open else "[", ")" if high_open else "]"
        allowed = f"{'>' if low_open else '>='} {low}" if high is None else f"in {start}{low}, {high}{end}"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def _check_names(name: str, value, allowed: tuple[str, ...], may_be_empty: bool) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set)):
        raise TypeError(f"{name} must be a list of names from {list(allowed)}, got {value!r}")
    # a set's order depends on the process's string hashing (PYTHONHASHSEED), and the layers draw their initial
    # factors in this order: a set is taken in the canonical order, so one seed gives one adapter in every process
    names = sorted(value, key=lambda v: allowed.index(v) if v in allowed else len(allowed)) if isinstance(
        value, set) else list(value)
    unknown = [v for v in names if v not in allowed]
    if unknown:
        raise ValueError(f"{name} has unknown projection(s) {unknown}; allowed: {list(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{name} lists a projection twice: {names}")
    if not names and not may_be_empty:
        raise ValueError(f"{name} must name at least one of {list(allowed)}")
    return names


def _check_experts(value) -> None:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("num_experts as a per-layer list must not be empty")
        for i, n in enumerate(value):
            _check_int(f"num_experts[{i}]", n, 1)
    else:
        _check_int("num_experts", value, 1)


@dataclass
class ExpertAdapterConfig(PeftConfig):
    """Base of peft-mole configs: LoRA experts on the MLP projections, a router, attention LoRA.

    Subclasses set `PEFT_TYPE` and add their routing fields, `routing_rule()` and `layer_aux_loss()`.
    """

    PEFT_TYPE = ""
    SELECTION_VARIES = False  # True where the rule picks a data-dependent number of experts per token (DynMoLE)

    num_experts: int | list[int] = field(
        default=8,
        metadata={"help": "Experts per MoE layer (E): an int, or one int per decoder layer (MoLA, e.g. [2, 4, 6, 8])."},
    )
    r: int = field(default=16, metadata={"help": "Rank of each expert's LoRA."})
    lora_alpha: int = field(default=32, metadata={"help": "Expert LoRA alpha; scale s = alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={
        "help": "Dropout on the expert LoRA input, in [0, 1) (on CPU rounded to a multiple of 2^-15, see "
                "docs/mixlora.md)."})
    use_rslora: bool = field(
        default=False, metadata={"help": "Rank-stabilised scale s = alpha / sqrt(r), for experts and attention."}
    )
    use_dora: bool = field(
        default=False, metadata={"help": "DoRA experts (MixDoRA): a learned magnitude per expert and output row."}
    )
    expert_target_modules: list[str] = field(
        default_factory=lambda: list(EXPERT_PROJECTIONS),
        metadata={"help": f"MLP projections that carry expert LoRA, a non-empty subset of {EXPERT_PROJECTIONS}."},
    )
    attn_target_modules: list[str] = field(
        default_factory=lambda: list(ATTENTION_PROJECTIONS),
        metadata={"help": f"Attention projections with plain LoRA, a subset of {ATTENTION_PROJECTIONS}; [] = none."},
    )
    attn_r: int | None = field(default=None, metadata={"help": "Attention LoRA rank (None: same as r)."})
    attn_lora_alpha: int | None = field(
        default=None, metadata={"help": "Attention LoRA alpha (None: same as lora_alpha)."}
    )
    attn_lora_dropout: float | None = field(
        default=None, metadata={"help": "Attention LoRA dropout (None: same as lora_dropout)."}
    )
    jitter_noise: float = field(
        default=0.0, metadata={"help": "Training-time multiplicative router input noise x*U(1-eps, 1+eps), eps in [0, 1)."}
    )
    router_init_std: float = field(default=0.02, metadata={"help": "Router weights init N(0, std^2)."})
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Decoder layer indices to adapt (None: all)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Set automatically: the attention projections and the MLP blocks found by structure."},
    )
    bias: str = field(default="none", metadata={"help": "Only 'none' is supported."})
    base_model_shape: dict | None = field(
        default=None,
        metadata={"help": "Set automatically: hidden/MLP size, layers and vocabulary of the base the adapter was made "
                          "for; loading onto a base of another shape is refused."},
    )

    # fields adapter_config.json must state (they shape the tensors or the routing); subclasses add theirs
    REQUIRED_ON_LOAD = (
        "num_experts", "r", "lora_alpha", "use_rslora", "use_dora", "expert_target_modules", "attn_target_modules",
        "attn_r", "attn_lora_alpha", "layers_to_transform",
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """PEFT's loader, after checking the weights file of a local folder (readable safetensors, no pickle, no
        factor without its partner or DoRA magnitude) or a Hub repo (no pickle alone)."""
        path = str(pretrained_model_name_or_path)
        names = check_weights_file(path, subfolder, kwargs.get("revision"), kwargs.get("token"),
                                   bool(kwargs.get("local_files_only")), kwargs.get("cache_dir"))
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if names is not None:
            check_complete_factors(names, bool(config.use_dora), os.path.join(path, subfolder or "", SAFETENSORS_NAME))
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's config file, then the peft-mole section and tags of README.md (`peft_mole.model_card`). A folder
        where `PeftModel.save_pretrained(..., safe_serialization=False)` has just written a pickle adapter_model.bin
        (and no safetensors) is refused, before the config makes it look saved: peft-mole loads safetensors only."""
        weights = os.path.join(save_directory, PICKLE_NAME)
        if os.path.isfile(weights) and not os.path.isfile(os.path.join(save_directory, SAFETENSORS_NAME)):
            raise ValueError(
                f"safe_serialization=False wrote a pickle {PICKLE_NAME} to {save_directory}, which peft-mole refuses "
                "to load; save with safe_serialization=True (the default; Trainer: save_safetensors=True), or convert "
                f"it with peft_mole.convert_bin_adapter({save_directory!r})"
            )
        super().save_pretrained(save_directory, **kwargs)
        from peft_mole.model_card import update_model_card

        update_model_card(save_directory, self)

    @classmethod
    def check_kwargs(cls, **kwargs):
        kwargs = super().check_kwargs(**kwargs)
        check_saved_keys(cls.__name__, kwargs, cls.REQUIRED_ON_LOAD)
        return kwargs

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = add_peft_type(self.PEFT_TYPE)
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        self.validate()

    def _check_target_modules(self) -> None:
        """`target_modules` is derived from `attn_target_modules` and `expert_target_modules`. A value no such
        derivation gives is a LoRA habit and refused: a string (`"all-linear"`), a name outside the projections, or
        no expert projection (`["q_proj", "v_proj"]`); with both lists as they are by default, any set but theirs
        (`["gate_proj", "up_proj", "down_proj"]` would otherwise get attention LoRA too). A derived set is taken and
        derived again (`dataclasses.replace` passes the old config's set back with new lists; a saved config holds
        its own)."""
        value = self.target_modules
        if value is None:
            return
        everything = set(ATTENTION_PROJECTIONS) | set(EXPERT_PROJECTIONS)
        derivable = (isinstance(value, (list, tuple, set))  # (not a string such as "all-linear")
                     and set(value) <= everything and bool(set(value) & set(EXPERT_PROJECTIONS)))
        if derivable and self.attn_target_modules == list(ATTENTION_PROJECTIONS) \
                and self.expert_target_modules == list(EXPERT_PROJECTIONS):
            derivable = set(value) == everything
        if not derivable:
            raise ValueError(
                f"target_modules is set from attn_target_modules and expert_target_modules, got {value!r}; give "
                f"attn_target_modules (a subset of {list(ATTENTION_PROJECTIONS)}, plain LoRA) and "
                f"expert_target_modules (a subset of {list(EXPERT_PROJECTIONS)}, the experts) instead"
            )

    def __getstate__(self) -> dict:
        """Pickled without the tuner it is attached to (a weak reference, for the model card's router statistics)."""
        state = dict(self.__dict__)
        state.pop("_tuner_ref", None)
        return state

    def validate(self) -> None:
        """Check every field; raise TypeError/ValueError naming the field, the value and what is allowed."""
        _check_experts(self.num_experts)
        if isinstance(self.num_experts, tuple):
            self.num_experts = list(self.num_experts)
        _check_int("r", self.r, 1)
        _check_float("lora_alpha", self.lora_alpha, 0.0, low_open=True)  # 0: s = 0, nothing would learn
        _check_float("lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        for name in ("use_rslora", "use_dora", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self.expert_target_modules = _check_names(
            "expert_target_modules", self.expert_target_modules, EXPERT_PROJECTIONS, may_be_empty=False
        )
        self.attn_target_modules = _check_names(
            "attn_target_modules", self.attn_target_modules, ATTENTION_PROJECTIONS, may_be_empty=True
        )
        if self.attn_r is not None:
            _check_int("attn_r", self.attn_r, 1)
        if self.attn_lora_alpha is not None:
            _check_float("attn_lora_alpha", self.attn_lora_alpha, 0.0, low_open=True)
        if self.attn_lora_dropout is not None:
            _check_float("attn_lora_dropout", self.attn_lora_dropout, 0.0, 1.0, high_open=True)
        _check_float("jitter_noise", self.jitter_noise, 0.0, 1.0, high_open=True)
        _check_float("router_init_std", self.router_init_std, 0.0)
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if isinstance(layers, int) else layers
            if isinstance(items, str) or not isinstance(items, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in items
            ):
                raise TypeError(f"layers_to_transform must be an int or a list of ints, got {layers!r}")
            if any(i < 0 for i in items):
                raise ValueError(f"layers_to_transform must hold layer indices >= 0, got {layers!r}")
        modules = self.modules_to_save
        if modules is not None and (
            isinstance(modules, str) or not isinstance(modules, (list, tuple, set))
            or not all(isinstance(m, str) for m in modules)
        ):
            raise TypeError(f"modules_to_save must be a list of module names or None, got {modules!r}")
        if self.bias != "none":
            raise ValueError(f"bias must be 'none' (peft-mole adapters train no biases), got {self.bias!r}")
        self._check_target_modules()
        self.target_modules = sorted(set(self.attn_target_modules) | set(self.expert_target_modules))

    @property
    def min_experts_per_layer(self) -> int:
        """The fewest experts of an adapted layer (a per-layer list's entries of the `layers_to_transform` layers
        only: before 2026-12-08 a layer left out bounded `top_k`/`min_experts` too)."""
        if not isinstance(self.num_experts, list):
            return self.num_experts
        layers = self.layers_to_transform
        wanted = [layers] if isinstance(layers, int) else layers
        adapted = [self.num_experts[i] for i in (wanted or []) if 0 <= i < len(self.num_experts)]
        return min(adapted or self.num_experts)

    def experts_in_layer(self, layer_index: int | None) -> int:
        """E of decoder layer `layer_index` (a per-layer list is indexed by the decoder layer)."""
        if not isinstance(self.num_experts, list):
            return self.num_experts
        if layer_index is None or layer_index >= len(self.num_experts):
            raise ValueError(
                f"num_experts has {len(self.num_experts)} entries (one per decoder layer) but the model has a "
                f"layer with index {layer_index}; give one entry per decoder layer"
            )
        return self.num_experts[layer_index]

    @property
    def attention_lora(self) -> tuple[int, float, float]:
        """(r, alpha, dropout) of the attention LoRA, falling back to the expert values."""
        r = self.r if self.attn_r is None else self.attn_r
        alpha = self.lora_alpha if self.attn_lora_alpha is None else self.attn_lora_alpha
        dropout = self.lora_dropout if self.attn_lora_dropout is None else self.attn_lora_dropout
        return r, alpha, dropout

    def scaling(self, r: int, alpha: float) -> float:
        """LoRA scale s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        return alpha / (r**0.5) if self.use_rslora else alpha / r

    def routing_rule(self):
        """probs (T, E) -> (weights, experts) for this adapter."""
        raise NotImplementedError

    def layer_aux_loss(
        self, probs: torch.Tensor, selected: torch.Tensor, token_mask: torch.Tensor | None = None,
        whole: routing.WholeLoad | None = None,
    ) -> torch.Tensor:
        """Auxiliary loss of one MoE layer from its non-padding router probabilities and selections, or from all
        rows and the (T,) `token_mask` of those that count (under torch.compile). `whole`: these tokens are a piece
        of a micro-batch with these statistics; return the piece's share of the whole's loss (`routing.WholeLoad`:
        the shares and their gradients add up to the whole's)."""
        raise NotImplementedError
