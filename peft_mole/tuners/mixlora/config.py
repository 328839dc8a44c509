"""MixLoRAConfig: LoRA experts in the frozen MLP, a top-k router, attention LoRA (MixLoRA, Li et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

from peft_mole.registration import add_peft_type

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def _check_float(name: str, value, low: float, high: float | None = None, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    too_high = high is not None and (value >= high if high_open else value > high)
    if value < low or too_high:
        bracket = ")" if high_open else "]"
        allowed = f">= {low}" if high is None else f"in [{low}, {high}{bracket}"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def _check_names(name: str, value, allowed: tuple[str, ...], may_be_empty: bool) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set)):
        raise TypeError(f"{name} must be a list of names from {list(allowed)}, got {value!r}")
    names = list(value)
    unknown = [v for v in names if v not in allowed]
    if unknown:
        raise ValueError(f"{name} has unknown projection(s) {unknown}; allowed: {list(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{name} lists a projection twice: {names}")
    if not names and not may_be_empty:
        raise ValueError(f"{name} must name at least one of {list(allowed)}")
    return names


@dataclass
class MixLoRAConfig(PeftConfig):
    """Configuration of a MixLoRA adapter (SPEC.md §1).

    Each decoder MLP block FFN(x) = W2(σ(W1 x) ⊙ W3 x) becomes a mixture of E experts
    FFN_e with W_e = W + s·B_e A_e on the projections named in `expert_target_modules`; a router picks the
    top-k experts per token; attention projections get ordinary LoRA with their own settings.

    Example:
        >>> import peft_mole
        >>> cfg = peft_mole.MixLoRAConfig(num_experts=8, top_k=2, r=16, lora_alpha=32)
        >>> cfg.peft_type.value
        'PEFT_MOLE_MIXLORA'
    """

    num_experts: int = field(default=8, metadata={"help": "Number of LoRA experts per MLP block (E)."})
    top_k: int = field(default=2, metadata={"help": "Experts used per token (k), 1 <= k <= num_experts."})
    r: int = field(default=16, metadata={"help": "Rank of each expert's LoRA."})
    lora_alpha: int = field(default=32, metadata={"help": "Expert LoRA alpha; scale s = alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the expert LoRA input, in [0, 1)."})
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
    router_aux_loss_coef: float = field(
        default=0.01, metadata={"help": "Weight a of the load-balance loss: loss += a * mean over layers of L_lb."}
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

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = add_peft_type("PEFT_MOLE_MIXLORA")
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        self.validate()

    def validate(self) -> None:
        """Check every field; raise TypeError/ValueError naming the field, the value and what is allowed."""
        _check_int("num_experts", self.num_experts, 1)
        _check_int("top_k", self.top_k, 1)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")
        _check_int("r", self.r, 1)
        _check_float("lora_alpha", self.lora_alpha, 0.0)
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
            _check_float("attn_lora_alpha", self.attn_lora_alpha, 0.0)
        if self.attn_lora_dropout is not None:
            _check_float("attn_lora_dropout", self.attn_lora_dropout, 0.0, 1.0, high_open=True)
        _check_float("router_aux_loss_coef", self.router_aux_loss_coef, 0.0)
        _check_float("jitter_noise", self.jitter_noise, 0.0, 1.0, high_open=True)
        _check_float("router_init_std", self.router_init_std, 0.0)
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if isinstance(layers, int) else layers
            if isinstance(items, str) or not isinstance(items, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
            ):
                raise ValueError(f"layers_to_transform must be a non-negative int or a list of them, got {layers!r}")
        if self.bias != "none":
            raise ValueError(f"bias must be 'none' (MixLoRA trains no biases), got {self.bias!r}")
        self.target_modules = sorted(set(self.attn_target_modules) | set(self.expert_target_modules))

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
