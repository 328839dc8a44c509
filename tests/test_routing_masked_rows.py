"""Rows the token mask leaves out never reach the auxiliary losses, NaN ones included; and a per-layer `num_experts`
list bounds `top_k`/`min_experts` by the adapted layers only (a review, 2026-12-08)."""

from __future__ import annotations

import math

import pytest
import torch

from peft_mole import routing
from tests.helpers import dynmole, mixlora


def test_a_nan_in_a_masked_out_row_does_not_reach_the_losses():
    """Masked (not removed) rows are weighted by 0, and 0 · NaN = NaN: both losses were NaN, gradients too."""
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [math.nan] * 4], requires_grad=True)
    selected = torch.tensor([[True, False, False, False], [False, True, False, False]])
    mask = torch.tensor([True, False])
    tsallis = routing.tsallis_loss(probs, 1.1, mask)
    balance = routing.load_balance_loss(probs, selected, mask)
    torch.testing.assert_close(tsallis, routing.tsallis_loss(probs[:1].detach(), 1.1))
    torch.testing.assert_close(balance, routing.load_balance_loss(probs[:1].detach(), selected[:1]))
    (grad,) = torch.autograd.grad(tsallis + balance, probs)
    assert torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros(4))
    whole = routing.tsallis_loss(probs, 1.1, mask, whole_tokens=2)
    assert torch.isfinite(whole)


def test_per_layer_expert_counts_bound_top_k_and_min_experts_by_adapted_layers_only():
    """Layer 0 (one expert) is left out by `layers_to_transform`: it no longer bounds min_experts or top_k."""
    assert dynmole(num_experts=[1, 4], layers_to_transform=[1]).min_experts == 2
    assert mixlora(num_experts=[1, 4], top_k=2, layers_to_transform=[1]).top_k == 2
    with pytest.raises(ValueError, match=r"min_experts must be <= num_experts \(1\)"):
        dynmole(num_experts=[1, 4])
