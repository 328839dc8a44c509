"""MixLoRAConfig: LoRA experts in the frozen MLP, a top-k router, attention LoRA (MixLoRA, Li et al. 2024)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from peft_mole import routing
from peft_mole.tuners.expert_config import ExpertAdapterConfig, _check_float, _check_int


@dataclass
class MixLoRAConfig(ExpertAdapterConfig):
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

    PEFT_TYPE = "PEFT_MOLE_MIXLORA"

    top_k: int = field(default=2, metadata={"help": "Experts used per token (k), 1 <= k <= num_experts."})
    router_aux_loss_coef: float = field(
        default=0.01, metadata={"help": "Weight a of the load-balance loss: loss += a * mean over layers of L_lb."}
    )

    REQUIRED_ON_LOAD = ExpertAdapterConfig.REQUIRED_ON_LOAD + ("top_k",)

    def validate(self) -> None:
        super().validate()
        _check_int("top_k", self.top_k, 1)
        if self.top_k > self.min_experts_per_layer:
            raise ValueError(f"top_k must be <= num_experts ({self.min_experts_per_layer}), got {self.top_k}")
        _check_float("router_aux_loss_coef", self.router_aux_loss_coef, 0.0)

    def routing_rule(self):
        """Top-k with renormalised weights (MixLoRA router; SPEC.md §1)."""
        return functools.partial(routing.top_k_routing, k=self.top_k, renormalize=True)

    def layer_aux_loss(
        self, probs: torch.Tensor, selected: torch.Tensor, token_mask: torch.Tensor | None = None,
        whole: routing.WholeLoad | None = None,
    ) -> torch.Tensor:
        """a · L_lb (SPEC.md §1); the model's aux loss is its mean over MoE layers. `whole`: a piece's share
        (`routing.WholeLoad`)."""
        return self.router_aux_loss_coef * routing.load_balance_loss(probs, selected, token_mask, whole)
