"""DynMoLEConfig: MixLoRA-style experts with the Tsallis-entropy hybrid router (DynMoLE, SPEC.md §2)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from peft_mole import routing
from peft_mole.tuners.expert_config import ExpertAdapterConfig, _check_float, _check_int

ROUTER_SCOPES = ("block", "projection")


@dataclass
class DynMoLEConfig(ExpertAdapterConfig):
    """Configuration of a DynMoLE adapter.

    Per token, with p = softmax(router logits) and h = S_q(p)/S_max its normalised Tsallis entropy:
    h > broadcast_threshold → all experts (weights p); else the top-p experts (inclusive cumulative mass ≤ top_p)
    and at least `min_experts`. Aux loss per layer: entropy_loss_coef · mean_t h(t) + lb_loss_coef · L_lb.

    Example:
        >>> import peft_mole
        >>> peft_mole.DynMoLEConfig(num_experts=[2, 4, 6, 8], q=1.1).peft_type.value
        'PEFT_MOLE_DYNMOLE'
    """

    PEFT_TYPE = "PEFT_MOLE_DYNMOLE"
    SELECTION_VARIES = True

    q: float = field(
        default=1.1, metadata={"help": "Tsallis entropy index q > 0 (q = 1: Shannon entropy; else |q − 1| ≥ 0.001)."}
    )
    top_p: float = field(default=0.75, metadata={"help": "Probability mass kept by the top-p rule, in (0, 1]."})
    broadcast_threshold: float = field(
        default=0.9, metadata={"help": "Normalised entropy above which a token uses all experts, in [0, 1]."}
    )
    min_experts: int = field(default=2, metadata={"help": "Experts always kept per token (most probable first)."})
    entropy_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the Tsallis entropy loss."})
    lb_loss_coef: float = field(default=0.001, metadata={"help": "Weight of the load-balance loss."})
    renormalize: bool = field(
        default=False, metadata={"help": "Renormalise the selected weights to sum to 1 (reference: False)."}
    )
    router_scope: str = field(
        default="block",
        metadata={"help": "'block': one router per MLP block (shared frozen weights); 'projection': one router "
                          "and experts per targeted gate/up/down projection (DynMoLE reference)."},
    )

    REQUIRED_ON_LOAD = ExpertAdapterConfig.REQUIRED_ON_LOAD + (
        "q", "top_p", "broadcast_threshold", "min_experts", "renormalize", "router_scope",
    )

    def validate(self) -> None:
        super().validate()
        _check_float("q", self.q, 0.0, low_open=True)
        if self.q != 1.0 and round(abs(self.q - 1.0), 12) < routing.MIN_Q_DISTANCE:  # (0.999 is allowed)
            raise ValueError(
                f"q must be 1.0 (Shannon entropy) or differ from 1 by at least {routing.MIN_Q_DISTANCE}, got {self.q}: "
                "near 1, (1 − Σ p^q) / (q − 1) is a difference of nearly equal fp32 numbers divided by a tiny one "
                "(at q = 1 + 1e-7 a uniform router over 8 experts had 0.57 of its maximum entropy instead of 1)"
            )
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_float("broadcast_threshold", self.broadcast_threshold, 0.0, 1.0)
        _check_int("min_experts", self.min_experts, 1)
        if self.min_experts > self.min_experts_per_layer:
            raise ValueError(
                f"min_experts must be <= num_experts ({self.min_experts_per_layer}), got {self.min_experts}"
            )
        _check_float("entropy_loss_coef", self.entropy_loss_coef, 0.0)
        _check_float("lb_loss_coef", self.lb_loss_coef, 0.0)
        if not isinstance(self.renormalize, bool):
            raise TypeError(f"renormalize must be a bool, got {self.renormalize!r}")
        if self.router_scope not in ROUTER_SCOPES:
            raise ValueError(f"router_scope must be one of {list(ROUTER_SCOPES)}, got {self.router_scope!r}")
        if self.router_scope == "projection" and self.use_dora:
            raise ValueError("use_dora=True is not supported with router_scope='projection'; use 'block'")

    def routing_rule(self):
        """The hybrid rule of DynMoLE (SPEC.md §2) with this config's q, top_p, threshold and min_experts."""
        return functools.partial(
            routing.dynmole_routing, q=self.q, top_p=self.top_p, broadcast_threshold=self.broadcast_threshold,
            min_experts=self.min_experts, renormalize=self.renormalize,
        )

    def layer_aux_loss(
        self, probs: torch.Tensor, selected: torch.Tensor, token_mask: torch.Tensor | None = None,
        whole: routing.WholeLoad | None = None,
    ) -> torch.Tensor:
        """entropy_loss_coef · mean_t h(t) + lb_loss_coef · L_lb (SPEC.md §2), one MoE layer. `whole`: a piece's
        share (`routing.WholeLoad`)."""
        tokens = None if whole is None else whole.tokens
        return self.entropy_loss_coef * routing.tsallis_loss(probs, self.q, token_mask, tokens) + self.lb_loss_coef * (
            routing.load_balance_loss(probs, selected, token_mask, whole)
        )
