"""Routing math of Mixture-of-LoRA-Experts, as pure functions on tensors.

Notation (SPEC.md): T tokens, E experts, router logits (T, E), p = softmax(logits).
A routing rule returns a *selection*: `weights` (T, k) and `experts` (T, k); a token that uses fewer than k
experts pads its row with weight 0 (such slots are dropped by `selection_mask`).
"""

from __future__ import annotations

import torch


def router_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """p = softmax(logits) over the expert axis, computed in fp32 (MixLoRA §3.2).

    Args:
        logits: (T, E) router logits, any float dtype.
    Returns:
        (T, E) fp32 probabilities.

    Example:
        >>> router_probabilities(torch.zeros(1, 4))
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    return torch.softmax(logits.float(), dim=-1)


def top_k_routing(probs: torch.Tensor, k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k rule (MixLoRA §3.2, Switch/Mixtral): keep the k most probable experts per token.

    w_e = p_e / Σ_{j∈topk} p_j for e in topk (renormalised; `renormalize=False` keeps w_e = p_e).

    Args:
        probs: (T, E) router probabilities.
        k: experts per token, 1 ≤ k ≤ E.
    Returns:
        weights (T, k) and experts (T, k) long, most probable first.

    Example:
        >>> w, e = top_k_routing(torch.tensor([[0.1, 0.6, 0.3]]), k=2)
        >>> e.tolist(), [round(x, 4) for x in w[0].tolist()]
        ([[1, 2]], [0.6667, 0.3333])
    """
    num_experts = probs.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, {num_experts}] (the number of experts), got {k}")
    weights, experts = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def selection_mask(experts: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, E) boolean mask: token t selected expert e (slots with weight 0 are padding, not selections)."""
    mask = torch.zeros(experts.shape[0], num_experts, dtype=torch.bool, device=experts.device)
    return mask.scatter_(1, experts, weights != 0) if experts.numel() else mask


def load_balance_loss(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Load-balance loss (Switch Transformer eq. 4, normalised as in SPEC.md §1).

        f_i = (selections of expert i) / (all selections)      (= 1/(|T|·k) Σ_t [i ∈ selected(t)] for top-k)
        P_i = (1/|T|) Σ_t p_i(t)
        L_lb = E · Σ_i f_i · P_i

    Σ_i f_i = 1, so L_lb = 1 exactly when routing is perfectly balanced (f_i = P_i = 1/E) and grows to E when
    every token picks the same expert with certainty. Gradients flow through P only (f is a count).

    Args:
        probs: (T, E) router probabilities of the tokens that count (padding already removed).
        selected: (T, E) bool selection mask of the same tokens.
    Returns:
        scalar fp32 loss; 0 when there are no tokens.

    Example:
        >>> p = torch.full((4, 2), 0.5); s = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]]).bool()
        >>> load_balance_loss(p, s).item()
        1.0
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    num_experts = probs.shape[-1]
    counts = selected.float().sum(dim=0)  # (E,)
    fraction = counts / counts.sum().clamp(min=1)  # f, (E,)
    mean_prob = probs.float().mean(dim=0)  # P, (E,)
    return num_experts * torch.dot(fraction, mean_prob)


def expert_load(selected: torch.Tensor) -> torch.Tensor:
    """Fraction of all selections that went to each expert, (E,) fp32 — the `f` of the load-balance loss."""
    counts = selected.float().sum(dim=0)
    return counts / counts.sum().clamp(min=1)
