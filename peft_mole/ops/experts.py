"""Expert dispatch for Mixture-of-LoRA-Experts layers.

`dispatch` turns a routing selection into a token order grouped by expert (one stable sort per layer);
`grouped_lora` applies each expert's LoRA factors to its contiguous segment. Only selected (token, expert)
pairs are computed — never all experts for all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dispatch:
    """(token, expert) pairs of a selection, sorted by expert.

    token: (M,) token index of each pair; weight: (M,) routing weight; counts: pairs per expert (E ints),
    so expert e owns the segment counts[:e].sum() : counts[:e+1].sum().
    """

    token: torch.Tensor
    weight: torch.Tensor
    counts: list[int]


def dispatch(weights: torch.Tensor, experts: torch.Tensor, num_experts: int) -> Dispatch:
    """Sort the selected (token, expert) pairs by expert; pairs with weight 0 (unused slots) are dropped.

    Args:
        weights: (T, k) routing weights; experts: (T, k) expert indices.
    """
    num_tokens, k = experts.shape
    flat_expert = experts.reshape(-1)
    flat_weight = weights.reshape(-1)
    flat_token = torch.arange(num_tokens, device=experts.device).repeat_interleave(k)
    keep = flat_weight != 0
    if not bool(keep.all()):
        flat_expert, flat_weight, flat_token = flat_expert[keep], flat_weight[keep], flat_token[keep]
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts).tolist()
    return Dispatch(token=flat_token[order], weight=flat_weight[order], counts=counts)


def grouped_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    counts: list[int],
    scaling: float,
    dropout: torch.nn.Module,
) -> torch.Tensor:
    """Per-expert LoRA on expert-sorted rows: out[seg_e] = s · B_e A_e dropout(x[seg_e]).

    Args:
        x: (M, in) rows sorted by expert; lora_a: (E, r, in); lora_b: (E, out, r); counts: rows per expert.
    Returns:
        (M, out) in the adapter dtype.
    """
    x = dropout(x.to(lora_a.dtype))
    outs = []
    for e, segment in enumerate(torch.split(x, counts)):
        if segment.shape[0]:
            outs.append((segment @ lora_a[e].t()) @ lora_b[e].t())
    if not outs:
        return x.new_zeros(0, lora_b.shape[1])
    return torch.cat(outs) * scaling
