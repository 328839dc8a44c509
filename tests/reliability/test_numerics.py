"""Numerics: NaN/inf found and named per layer (opt-in), fp32 routers under bf16 autocast, DynMoLE entropy with
exact zeros, and DoRA/no-DoRA gradients that stay finite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

import peft_mole
from peft_mole import routing
from tests.helpers import METHODS, batch, randomize_adapters, tiny_base


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_nan_router_weights_are_named_with_the_layer(method):
    model = get_peft_model(tiny_base(), METHODS[method]())
    randomize_adapters(model)
    router = next(p for n, p in model.named_parameters() if "layers.1.mlp" in n and "router" in n)
    with torch.no_grad():
        router[0, 0] = float("nan")
    ids, mask, _ = batch(2, 6)
    with peft_mole.check_finite(model), pytest.raises(FloatingPointError, match=r"router logits of .*layers\.1\.mlp"):
        model(input_ids=ids, attention_mask=mask)
    model(input_ids=ids, attention_mask=mask)  # checks off again: no error, NaN flows on as usual


def test_nested_checks_keep_the_router_check_until_the_outer_one_ends():
    """The inner `check_finite`'s end turned the router-logit checks off for the outer one too."""
    model = get_peft_model(tiny_base(), METHODS["mixlora"]())
    router = model.base_model.model.model.layers[1].mlp.routers["default"].weight
    with torch.no_grad():
        router[0, 0] = float("nan")
    ids, mask, _ = batch(2, 6)
    with peft_mole.check_finite(model):
        inner = peft_mole.check_finite(model)
        inner.remove()
        inner.remove()  # (twice: counted once)
        with pytest.raises(FloatingPointError, match=r"router logits of .*layers\.1\.mlp"):
            model(input_ids=ids, attention_mask=mask)
    model(input_ids=ids, attention_mask=mask)  # both ended: off


def test_nan_input_is_named_with_the_first_layer_that_sees_it():
    model = get_peft_model(tiny_base(), METHODS["mixlora"]())
    embeds = model.get_input_embeddings()(batch(1, 4)[0]).detach()
    embeds[0, 2, 5] = float("inf")
    with peft_mole.check_finite(model), pytest.raises(FloatingPointError, match=r"input of .*layers\.0\.self_attn\.q_proj"):
        model(inputs_embeds=embeds)
    with pytest.raises(ValueError, match="needs a model with peft-mole layers"):
        peft_mole.check_finite(tiny_base())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_router_stays_fp32_under_16_bit_autocast(method, dtype):
    model = get_peft_model(tiny_base(), METHODS[method]())
    randomize_adapters(model, std=0.3)
    model.train()
    inputs = {}
    mlp = model.base_model.model.model.layers[0].mlp
    mlp.register_forward_pre_hook(lambda module, args: inputs.setdefault("x", args[0].detach()))
    ids, mask, labels = batch(2, 8)
    with torch.autocast("cpu", dtype=dtype):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    record = next(r for r in model.base_model._last_records if r.layer.endswith("layers.0.mlp"))
    assert record.probs.dtype == torch.float32
    x = inputs["x"].float().reshape(-1, inputs["x"].shape[-1])
    weight = next(iter(mlp.routers.values())).weight.float()
    expected = torch.softmax(F.linear(x, weight), dim=-1)
    torch.testing.assert_close(record.probs, expected, atol=1e-6, rtol=1e-5)  # 16-bit logits would miss by ~1e-3


@pytest.mark.parametrize("q", [1.0, 1.1, 2.0])
def test_tsallis_entropy_and_its_gradient_are_finite_with_exact_zeros(q):
    logits = torch.tensor([[0.0, -float("inf"), -float("inf"), 1.0], [5.0, -200.0, -200.0, -200.0]], requires_grad=True)
    probs = torch.softmax(logits, dim=-1)  # exact zeros
    assert (probs == 0).any()
    entropy = routing.normalized_entropy(probs, q)
    loss = routing.tsallis_loss(probs, q)
    loss.backward()
    assert torch.isfinite(entropy).all() and torch.isfinite(loss) and torch.isfinite(logits.grad[:, [0, 3]]).all()
    weights, chosen = routing.dynmole_routing(probs, q=q, top_p=0.75, broadcast_threshold=0.9, min_experts=2)
    assert torch.isfinite(weights).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_are_finite_and_close_to_fp32_under_16_bit_autocast(method, dtype):
    model = get_peft_model(tiny_base(), METHODS[method]())
    randomize_adapters(model)
    ids, mask, labels = batch(2, 8, pad_last=3)
    params = [p for p in model.parameters() if p.requires_grad]
    reference = torch.autograd.grad(model(input_ids=ids, attention_mask=mask, labels=labels).loss, params)
    with torch.autocast("cpu", dtype=dtype):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    error = torch.cat([(g - r).flatten() for g, r in zip(grads, reference, strict=True)]).norm()
    assert error <= 0.05 * torch.cat([r.flatten() for r in reference]).norm()  # 16-bit rounding, not a wrong gradient
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "router" in n)
