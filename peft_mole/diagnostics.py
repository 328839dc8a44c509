"""Router diagnostics: which experts the routers of a MoE adapter use."""

from __future__ import annotations

import torch


@torch.no_grad()
def expert_load(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Fraction of the (non-padding) token→expert selections that each expert receives, per MoE layer.

    Runs one forward pass (dropout off) and returns {layer name: [load of expert 0, ..., E-1]} for the active
    adapter; a perfectly balanced layer has every entry = 1/E.

    Example:
        >>> load = expert_load(peft_model, ids, mask)            # doctest: +SKIP
        >>> load["model.layers.0.mlp"]                           # doctest: +SKIP
        [0.13, 0.11, ...]
    """
    tuner = model.base_model
    was_training = model.training
    model.eval()
    try:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    finally:
        model.train(was_training)
    stats = tuner.__dict__.get("last_router_stats", {})
    return {layer: load.tolist() for (_, layer), load in stats.items()}
