"""The learned state of E LoRA (or DoRA) experts on the projections of one MLP block."""

from __future__ import annotations

import math

import torch
from peft.tuners.lora import dora
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_mole.tuners.mixlora.targets import adapter_dtype


class ExpertLoRA(nn.Module):
    """Stacked expert factors per projection: `{proj}_lora_A` (E, r, in), `{proj}_lora_B` (E, out, r) and,
    with DoRA, `{proj}_magnitude` (E, out).

    LoRA (Hu et al. 2021): W_e = W + s·B_e A_e, A Kaiming-uniform, B = 0.
    DoRA (Liu et al. 2024, "MixDoRA" in the MixLoRA paper): W_e = m_e ⊙ (W + s·B_e A_e) / ‖W + s·B_e A_e‖_row,
    m_e initialised to ‖W‖_row, the norm treated as a constant in backward (as in the DoRA paper and PEFT).

    The row norms cost E·r·out·in multiply-adds per projection, more than a decoding step's products. Inside PEFT's
    `peft.helpers.DoraCaching()` and in eval mode they are computed once and kept (as PEFT caches its DoRA weight
    norm), until A, B or W change (their storage or version counter) or the module returns to training mode
    (`_cached_row_norms` says what a compiled call does).
    """

    def __init__(
        self, linears: dict[str, nn.Linear], num_experts: int, r: int, scaling: float, use_dora: bool
    ) -> None:
        super().__init__()
        self.projections = list(linears)
        self.scaling = scaling
        self.use_dora = use_dora
        self._norm_cache: dict[str, tuple[tuple, torch.Tensor]] = {}  # proj -> (key, (E, out) norms); not state
        for proj, base in linears.items():
            if isinstance(base, BaseTunerLayer):  # a projection another job's LoRA already wraps
                base = base.get_base_layer()
            weight = base.weight
            dtype = adapter_dtype(weight)
            lora_a = torch.empty(num_experts, r, base.in_features, device=weight.device, dtype=torch.float32)
            for e in range(num_experts):
                nn.init.kaiming_uniform_(lora_a[e], a=math.sqrt(5))
            lora_b = torch.zeros(num_experts, base.out_features, r, device=weight.device, dtype=dtype)
            self.register_parameter(f"{proj}_lora_A", nn.Parameter(lora_a.to(dtype)))
            self.register_parameter(f"{proj}_lora_B", nn.Parameter(lora_b))
            if use_dora:
                row_norm = weight.detach().float().norm(dim=1)  # (out,)
                magnitude = row_norm.expand(num_experts, -1).clone().to(dtype)
                self.register_parameter(f"{proj}_magnitude", nn.Parameter(magnitude))

    def factors(self, proj: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of a projection, or None when it carries no expert LoRA."""
        if proj not in self.projections:
            return None
        return getattr(self, f"{proj}_lora_A"), getattr(self, f"{proj}_lora_B")

    def dora_scale(self, proj: str, weight: torch.Tensor) -> torch.Tensor | None:
        """c_e = m_e / ‖W + s·B_e A_e‖_row for every expert, (E, out) fp32; None without DoRA.

        m gets its gradient through c; the norm is a constant (`row_norms`).
        """
        if not self.use_dora or proj not in self.projections:
            return None
        return getattr(self, f"{proj}_magnitude").float() / self._cached_row_norms(proj, weight)

    def _cached_row_norms(self, proj: str, weight: torch.Tensor) -> torch.Tensor:
        """`row_norms`, kept between calls inside `DoraCaching()` in eval mode.

        Eagerly an entry is used while A, B and W keep their storage and version counter. torch.compile cannot read
        version counters: a compiled call uses the entry an eager call left (`generate` runs its prefill eagerly,
        so each generation refreshes it before the compiled decoding steps), else computes the norms in its graph.
        Inference tensors (an adapter loaded under `torch.inference_mode()`) have no version counter: their entry
        stays while their storage does, as PEFT's own DoRA cache does for every tensor.
        """
        lora_a, lora_b = self.factors(proj)
        if not dora.ENABLE_DORA_CACHING or self.training:
            self._norm_cache.clear()
            return row_norms(weight, lora_a, lora_b, self.scaling)
        cached = self._norm_cache.get(proj)
        if torch.compiler.is_compiling():
            return row_norms(weight, lora_a, lora_b, self.scaling) if cached is None else cached[1]
        key = tuple((t.data_ptr(), _version(t), t.dtype, t.device) for t in (weight, lora_a, lora_b))
        if cached is None or cached[0] != key:
            cached = self._norm_cache[proj] = (key, row_norms(weight, lora_a, lora_b, self.scaling))
        return cached[1]

    def _cache_clear(self) -> None:
        """Forget the kept row norms (the name PEFT's DoRA layers give theirs: `quantised_eval` calls both)."""
        self._norm_cache.clear()

    def train(self, mode: bool = True):
        if mode:
            self._cache_clear()
        return super().train(mode)


def _version(t: torch.Tensor) -> int:
    """The in-place version counter of `t`, or -1 for an inference tensor (which has none)."""
    return -1 if t.is_inference() else t._version


def row_norms(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B_e A_e‖_row for every expert, (E, out) fp32, without gradient: a constant in backward, as in the
    DoRA paper and PEFT.

    From ‖W‖² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·Σ_k (B A Aᵀ)_ik B_ik, which never builds the E full (out, in) expert
    weights. Args: weight (out, in); lora_a (E, r, in); lora_b (E, out, r).
    """
    s = scaling
    with torch.no_grad():
        w, lora_a, lora_b = weight.float(), lora_a.float(), lora_b.float()
        w_at = torch.einsum("oi,eri->eor", w, lora_a)  # (E, out, r)
        cross = (lora_b * w_at).sum(-1)  # (E, out): W_row · (B A)_row
        b_aat = lora_b @ (lora_a @ lora_a.transpose(1, 2))  # (E, out, r)
        square = (b_aat * lora_b).sum(-1)  # (E, out): ‖(B A)_row‖²
        norm_sq = w.pow(2).sum(1).unsqueeze(0) + 2 * s * cross + s * s * square
        return norm_sq.clamp(min=1e-12).sqrt()
