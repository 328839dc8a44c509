"""The cheaper CPU dropout: its custom backward equals plain autograd, the drop rate is p rounded to 2^-15, the
expectation is preserved, masks follow torch's seed, and it is what MixLoRA/DynMoLE/LoRA-job layers use."""

import pytest
import torch
from peft import get_peft_model

import peft_mole
from peft_mole.ops.dropout import (
    Dropout,
    _MaskAndScale,
    _threshold,
    dropout,
    dropout_scale,
    keep_mask,
    register_stream,
)
from tests.helpers import tiny_base


def test_custom_backward_matches_plain_autograd():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    keep = keep_mask(x.shape, 0.3)
    assert torch.autograd.gradcheck(lambda t: _MaskAndScale.apply(t, keep, 1.7), (x,))
    grad_out = torch.randn(6, 5, dtype=torch.float64)
    (plain,) = torch.autograd.grad(x * keep * 1.7, x, grad_out)
    (ours,) = torch.autograd.grad(_MaskAndScale.apply(x, keep, 1.7), x, grad_out)
    torch.testing.assert_close(ours, plain, atol=0, rtol=0)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_and_expectation(p):
    torch.manual_seed(0)
    keep = keep_mask((2000, 1000), p)
    effective = round(p * 2**15) / 2**15  # p' of the module docstring: p on a 2^-15 grid
    assert _threshold(p) == effective * 2**15
    rate = 1 - keep.float().mean().item()
    assert abs(rate - effective) < 4 * (effective * (1 - effective) / keep.numel()) ** 0.5  # 4 sigma
    out = dropout(torch.ones(2000, 1000), p)
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - effective)))
    assert abs(out.mean().item() - 1) < 4 * (effective / (1 - effective) / out.numel()) ** 0.5


def test_masks_are_reproducible_and_the_quarters_are_independent():
    torch.manual_seed(3)
    a = keep_mask((4, 1000), 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask((4, 1000), 0.5))
    # the four 15-bit uniforms of one draw are neighbours: their masks must not agree more than chance
    masks = keep_mask((250_000, 4), 0.5).float()
    corr = torch.corrcoef(masks.T)
    assert (corr - torch.eye(4)).abs().max() < 0.01


def test_eval_mode_zero_p_and_edge_probabilities_fall_back():
    x = torch.randn(3, 4)
    module = Dropout(0.2).eval()
    assert module(x) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    torch.manual_seed(0)
    tiny_p = dropout(x, 1e-6)  # rounds to 0 levels: torch's own dropout, which rescales by 1 / (1 - 1e-6)
    assert not torch.equal(tiny_p, x)
    torch.testing.assert_close(tiny_p, x / (1 - 1e-6), atol=0, rtol=3e-7)  # x itself is 1e-6 away
    assert not keep_mask((4, 8), 1.0).any()  # (all True before 2026-12-08: the 16-bit draws against 2^15)


def test_mixlora_layers_use_it():
    model = get_peft_model(tiny_base(), peft_mole.MixLoRAConfig(num_experts=2, top_k=1, r=2, lora_dropout=0.1))
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(isinstance(m, Dropout) for m in dropouts)


def test_compiled_dropout_draws_the_eager_mask_from_the_same_generator():
    """Under torch.compile the mask is `compiled_keep_mask`, an operator the compiler leaves whole: after the same
    seed it is the eager mask, and the gradient is the mask scaled by 1 / (1 - p')."""
    x = torch.randn(33, 40, requires_grad=True)
    torch.manual_seed(7)
    eager = dropout(x, 0.3)
    compiled_fn = torch.compile(lambda t: dropout(t, 0.3), fullgraph=True, backend="aot_eager")
    torch.manual_seed(7)
    compiled = compiled_fn(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(grad, (eager != 0).float() * (eager / x).abs().max(), rtol=1e-6, atol=0)
    assert 0.6 < (eager != 0).float().mean() < 0.8


def test_dropout_modules_keep_their_own_masks_under_inductor():
    """q, k and v drop out the same input. The compiler merges calls of an operator with equal arguments (its
    common-subexpression pass exempts only torch's own random operators), so each `Dropout` passes its own
    call site: three masks, as eagerly, and three draws from the generator."""
    q, k, v = Dropout(0.5), Dropout(0.5), Dropout(0.5)
    x = torch.ones(64, 64, requires_grad=True)
    compiled = torch.compile(lambda t: torch.stack([q(t), k(t), v(t)]))
    torch.manual_seed(3)
    masks = compiled(x) != 0
    after_compiled = torch.rand(4)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert all(0.4 < m.float().mean() < 0.6 for m in masks)
    torch.manual_seed(3)
    eager = torch.stack([q(x), k(x), v(x)]) != 0
    torch.testing.assert_close(masks, eager, rtol=0, atol=0)  # the eager masks, in the eager order
    torch.testing.assert_close(torch.rand(4), after_compiled, rtol=0, atol=0)  # and as many draws


@pytest.mark.parametrize("p", [1e-5, 1 - 1e-5])
def test_a_stream_draws_at_p_itself_where_the_grid_would_give_0_or_1(p):
    """Where p' rounds to 0 or 1 (p < 2^-16, p > 1 - 2^-16), a module drawing from a stream of its own (a multi-job
    job's) drops with probability p and rescales by 1 / (1 - p), as `F.dropout` does without a stream (before:
    nothing dropped at p = 1e-5, everything at p = 1 - 1e-5, so E[dropout(x)] = 0)."""
    module = Dropout(p)
    module.use_stream(register_stream(torch.Generator().manual_seed(0)))
    out = module(torch.ones(4_000_000))
    kept = out[out != 0]
    assert 0 < kept.numel() < out.numel()
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))
    expected_kept = (1 - p) * out.numel()
    assert abs(kept.numel() - expected_kept) < 5 * (expected_kept * p) ** 0.5 + 1  # 5 sigma
    assert dropout_scale(p) == 1 / (1 - p)
