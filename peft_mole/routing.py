"""Routing math of Mixture-of-LoRA-Experts, as pure functions on tensors.

Notation (SPEC.md): T tokens, E experts, router logits (T, E), p = softmax(logits).
A routing rule returns a *selection*: `weights` (T, k) and `experts` (T, k); a token that uses fewer than k
experts pads its row with weight 0 (such slots are dropped by `selection_mask`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class WholeLoad(NamedTuple):
    """The load-balance statistics of a whole micro-batch that trains in pieces (an out-of-memory retry in halves,
    `MultiJobTrainer`): f of its tokens, and how many tokens count. A piece's losses then add up, over the pieces, to
    the whole's loss, and their gradients to its gradient (`load_balance_loss`, `tsallis_loss`)."""

    fraction: torch.Tensor  # (E,) f_i of the whole (`expert_load`)
    tokens: float  # |T| of the whole


def router_load(probs: torch.Tensor, selected: torch.Tensor, token_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, float]:
    """(selections per expert (E,) fp32, tokens that count) of one layer's tokens: what a piece adds to its whole
    micro-batch's `WholeLoad` (`token_mask`: as for `load_balance_loss`)."""
    if token_mask is not None:
        selected = selected & token_mask.unsqueeze(-1)
        return selected.float().sum(dim=0), float(token_mask.sum())
    return selected.float().sum(dim=0), float(probs.shape[0])


def router_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """p = softmax(logits) over the expert axis, computed in fp32 (MixLoRA router; SPEC.md §1).

    Args:
        logits: (T, E) router logits, any float dtype.
    Returns:
        (T, E) fp32 probabilities.

    Example:
        >>> router_probabilities(torch.zeros(1, 4))
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    return torch.softmax(logits.float(), dim=-1)


def largest(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row and their indices, largest first, equal values in index order (a stable
    sort). `torch.topk` breaks ties by the row's width and layout, so a job's experts inside the compiled multi-job
    step's wider row of every job's experts (`tuners.mixlora.per_row`) were other experts than alone (zero routers:
    every token a tie)."""
    values, indices = torch.sort(probs, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def top_k_routing(probs: torch.Tensor, k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k rule (MixLoRA router, as Switch/Mixtral; SPEC.md §1): keep the k most probable experts per token.

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
    weights, experts = largest(probs, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def selection_mask(experts: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, E) boolean mask: token t selected expert e (slots with weight 0 are padding, not selections)."""
    mask = torch.zeros(experts.shape[0], num_experts, dtype=torch.bool, device=experts.device)
    return mask.scatter_(1, experts, weights != 0) if experts.numel() else mask


def load_balance_loss(
    probs: torch.Tensor, selected: torch.Tensor, token_mask: torch.Tensor | None = None, whole: WholeLoad | None = None
) -> torch.Tensor:
    """Load-balance loss (Switch Transformer eq. 4, normalised as in SPEC.md §1).

        f_i = (selections of expert i) / (all selections)      (= 1/(|T|·k) Σ_t [i ∈ selected(t)] for top-k)
        P_i = (1/|T|) Σ_t p_i(t)
        L_lb = E · Σ_i f_i · P_i

    Σ_i f_i = 1, so L_lb = 1 exactly when routing is perfectly balanced (f_i = P_i = 1/E) and grows to E when
    every token picks the same expert with certainty. Gradients flow through P only (f is a count).

    Args:
        probs: (T, E) router probabilities of the tokens that count (padding already removed).
        selected: (T, E) bool selection mask of the same tokens.
        token_mask: (T,) bool or None: only the True rows count. Padding kept and masked out, the form that
            torch.compile traces (removing rows gives a shape that depends on the data).
        whole: these tokens are a piece of a micro-batch whose f and |T| these are: E · Σ_i f_i · Σ_t p_i(t) / |T|,
            the piece's share of the whole's loss (the shares add up to it, and so do their gradients).
    Returns:
        scalar fp32 loss; 0 when there are no tokens.

    Example:
        >>> p = torch.full((4, 2), 0.5); s = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]]).bool()
        >>> load_balance_loss(p, s).item()
        1.0
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    probs = _uncounted_as_uniform(probs, token_mask)
    if whole is not None:
        counted = probs.float() if token_mask is None else probs.float() * token_mask.to(torch.float32).unsqueeze(-1)
        return probs.shape[-1] * torch.dot(whole.fraction.to(counted.device), counted.sum(dim=0) / max(whole.tokens, 1))
    if token_mask is None:
        fraction = expert_load(selected)  # f, (E,)
        mean_prob = probs.float().mean(dim=0)  # P, (E,)
    else:
        counts = token_mask.to(torch.float32).unsqueeze(-1)  # (T, 1): 1 for a token that counts
        fraction = expert_load(selected & token_mask.unsqueeze(-1))
        mean_prob = (probs.float() * counts).sum(dim=0) / counts.sum().clamp(min=1)
    return probs.shape[-1] * torch.dot(fraction, mean_prob)


def _uncounted_as_uniform(probs: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """`probs` with the rows `token_mask` leaves out set to uniform before any arithmetic: they are then weighted by
    0, and a NaN there (0 · NaN = NaN) would otherwise reach the loss and its backward."""
    if token_mask is None:
        return probs
    return torch.where(token_mask.unsqueeze(-1), probs, torch.full_like(probs, 1.0 / probs.shape[-1]))


def expert_load(selected: torch.Tensor) -> torch.Tensor:
    """Fraction of all selections that went to each expert, (E,) fp32 — the `f` of the load-balance loss."""
    counts = selected.float().sum(dim=0)
    return counts / counts.sum().clamp(min=1)


# ---------------------------------------------------------------- DynMoLE (SPEC.md §2)
PROB_FLOOR = 1e-5  # p is clamped to >= 1e-5 before entropies (DynMoLE reference)
MIN_Q_DISTANCE = 1e-3  # q = 1 or |q − 1| ≥ this (`DynMoLEConfig`): nearer 1, S_q's fp32 cancellation error
# (about 3e-8 / |q − 1| on a uniform router's h) grows past 1e-4


def tsallis_entropy(probs: torch.Tensor, q: float) -> torch.Tensor:
    """Tsallis entropy of each row (DynMoLE; SPEC.md §2): S_q(p) = (1 − Σ_i p_i^q) / (q − 1); q = 1 gives Shannon −Σ p ln p.

    Args:
        probs: (T, E) probabilities (clamped to >= 1e-5 here).
    Returns:
        (T,) fp32 entropies.

    Example:
        >>> round(tsallis_entropy(torch.full((1, 4), 0.25), q=1.0).item(), 4)   # ln 4
        1.3863
    """
    p = probs.float().clamp(min=PROB_FLOOR)
    if q == 1.0:
        return -(p * p.log()).sum(dim=-1)
    return (1.0 - p.pow(q).sum(dim=-1)) / (q - 1.0)


def max_tsallis_entropy(num_experts: int, q: float) -> float:
    """S_max = S_q(uniform over E) = (1 − E^{1−q}) / (q − 1); ln E for q = 1."""
    if q == 1.0:
        return math.log(num_experts)
    return (1.0 - num_experts ** (1.0 - q)) / (q - 1.0)


def normalized_entropy(probs: torch.Tensor, q: float) -> torch.Tensor:
    """h = S_q(p) / S_max ∈ [0, 1] per row (up to fp32 rounding: a uniform router may give 1 + 2e-7): 1 for a
    uniform router, ≈ 0 for a one-hot router (0 when E = 1)."""
    num_experts = probs.shape[-1]
    if num_experts == 1:
        return probs.new_zeros(probs.shape[0], dtype=torch.float32)
    return tsallis_entropy(probs, q) / max_tsallis_entropy(num_experts, q)


def top_p_routing(
    probs: torch.Tensor, top_p: float, min_experts: int = 1, renormalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p rule (DynMoLE; SPEC.md §2): sort p descending, keep experts while the inclusive cumulative sum ≤ top_p
    (the expert that crosses top_p is not kept, as in the reference code), and always the `min_experts` most
    probable ones.

    Returns:
        weights (T, E) and experts (T, E), most probable first; dropped slots have weight 0.
        Weights are the kept p (not renormalised unless `renormalize`).

    Example:
        >>> w, e = top_p_routing(torch.tensor([[0.5, 0.2, 0.3]]), top_p=0.75, min_experts=1)
        >>> e.tolist(), w.tolist()
        ([[0, 2, 1]], [[0.5, 0.0, 0.0]])
    """
    sorted_p, experts = torch.sort(probs, dim=-1, descending=True, stable=True)  # (ties: as `largest`)
    if top_p >= 1.0:  # every expert: Σp = 1 exactly, but the fp32 cumulative sum may end above 1 and drop the last
        keep = torch.ones_like(sorted_p, dtype=torch.bool)
    else:
        keep = sorted_p.cumsum(dim=-1) <= top_p
    keep[:, : max(1, min_experts)] = True
    weights = sorted_p * keep
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def switch_routing(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch rule (Fedus et al. 2021): top-1 expert, weight p (not renormalised)."""
    return top_k_routing(probs, 1, renormalize=False)


def dynmole_routing(
    probs: torch.Tensor,
    q: float = 1.1,
    top_p: float = 0.75,
    broadcast_threshold: float = 0.9,
    min_experts: int = 2,
    renormalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DynMoLE hybrid rule (SPEC.md §2), per token:
    1. h = S_q(p)/S_max > broadcast_threshold (uncertain router): all experts, weights p;
    2. else top-p (≤ top_p inclusive cumulative mass) with at least `min_experts` experts, weights p.
    Weights are not renormalised unless `renormalize` (then Σ w = 1 per token).

    Returns:
        weights (T, E), experts (T, E), most probable first; unused slots have weight 0.
    """
    weights, experts = top_p_routing(probs, top_p, min_experts, renormalize=False)
    # h ∈ [0, 1] in exact arithmetic; in fp32 a uniform router's h can be 1 + 2e-7 (and a one-hot one's slightly
    # below 0), so the decision reads h clamped to [0, 1]: threshold 1 never broadcasts, whatever E and q
    broadcast = normalized_entropy(probs, q).clamp(0.0, 1.0) > broadcast_threshold  # (T,)
    sorted_p = probs.gather(-1, experts)
    weights = torch.where(broadcast.unsqueeze(-1), sorted_p, weights)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def tsallis_loss(probs: torch.Tensor, q: float, token_mask: torch.Tensor | None = None,
                 whole_tokens: float | None = None) -> torch.Tensor:
    """DynMoLE's entropy loss (SPEC.md §2): mean over tokens of the normalised Tsallis entropy h(t); 0 without tokens.

    Minimising it makes routers confident; it is paired with the load-balance loss so experts stay in use.
    `token_mask` (T,) bool: only its True rows count (as for `load_balance_loss`). `whole_tokens`: these tokens are
    a piece of a micro-batch of that many: Σ_t h(t) / whole_tokens, the piece's share of the whole's mean.
    """
    if probs.shape[0] == 0:
        return probs.new_zeros((), dtype=torch.float32)
    probs = _uncounted_as_uniform(probs, token_mask)
    if whole_tokens is not None:
        entropies = normalized_entropy(probs, q)
        counted = entropies if token_mask is None else entropies * token_mask.to(torch.float32)
        return counted.sum() / max(whole_tokens, 1)
    if token_mask is not None:
        counts = token_mask.to(torch.float32)
        return (normalized_entropy(probs, q) * counts).sum() / counts.sum().clamp(min=1)
    return normalized_entropy(probs, q).mean()
