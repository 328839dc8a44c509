"""DynMoLE: config, exactness of both router scopes, variable expert counts, aux loss, MoLA schedules."""

import pytest
import torch
from peft import get_peft_model

from peft_mole import DynMoLEConfig, routing
from peft_mole.tuners.dynmole.layer import DynMoLEMLP, DynMoLEProjection
from peft_mole.tuners.mixlora import layer as layer_module
from tests.helpers import batch, dynmole, mixlora, randomize_adapters, tiny_base


def test_defaults_follow_the_paper():
    cfg = DynMoLEConfig()
    assert (cfg.q, cfg.top_p, cfg.broadcast_threshold, cfg.min_experts) == (1.1, 0.75, 0.9, 2)
    assert (cfg.entropy_loss_coef, cfg.lb_loss_coef, cfg.renormalize, cfg.router_scope) == (0.01, 0.001, False, "block")
    assert cfg.peft_type.value == "PEFT_MOLE_DYNMOLE"


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(q=0), ValueError, r"q must be > 0.0, got 0"),
    (dict(q=-1), ValueError, r"q must be > 0.0, got -1"),  # (before: ">= 0.0", where 0 is refused too)
    (dict(q=1 + 1e-7), ValueError, r"q must be 1.0 \(Shannon entropy\) or differ from 1 by at least 0.001"),
    (dict(q=1 - 5e-4), ValueError, r"q must be 1.0 \(Shannon entropy\) or differ from 1 by at least 0.001"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0.0, 1.0\], got 0.0"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0.0, 1.0\], got 1.5"),  # (before: "[0.0, 1.0]")
    (dict(broadcast_threshold=-0.1), ValueError, r"broadcast_threshold must be in"),
    (dict(min_experts=0), ValueError, r"min_experts must be >= 1"),
    (dict(min_experts=5, num_experts=4), ValueError, r"min_experts must be <= num_experts \(4\), got 5"),
    (dict(min_experts=3, num_experts=[2, 4]), ValueError, r"min_experts must be <= num_experts \(2\)"),
    (dict(entropy_loss_coef=-1), ValueError, r"entropy_loss_coef must be >= 0"),
    (dict(renormalize="no"), TypeError, r"renormalize must be a bool"),
    (dict(router_scope="layer"), ValueError, r"router_scope must be one of \['block', 'projection'\]"),
    (dict(router_scope="projection", use_dora=True), ValueError, r"use_dora=True is not supported"),
    (dict(num_experts=[]), ValueError, r"num_experts as a per-layer list must not be empty"),
    (dict(num_experts=[2, 0]), ValueError, r"num_experts\[1\] must be >= 1"),
])
def test_bad_values_are_rejected_with_the_field_name(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        DynMoLEConfig(**kwargs)


def rule_of(cfg: DynMoLEConfig) -> dict:
    """The hybrid rule's settings as the config gives them (not read back from the layer under test)."""
    return dict(q=cfg.q, top_p=cfg.top_p, broadcast_threshold=cfg.broadcast_threshold, min_experts=cfg.min_experts,
                renormalize=cfg.renormalize)


def naive_block(layer, x, cfg: DynMoLEConfig, adapter="default"):
    """Σ_e w_e FFN_e(x) token by token, with the hybrid rule's (unrenormalised) weights and s = α / r, all from the
    config."""
    mlp, experts = layer.base_layer, layer.experts[adapter]
    probs = torch.softmax(x @ layer.routers[adapter].weight.t(), dim=-1)
    weights, chosen = routing.dynmole_routing(probs, **rule_of(cfg))
    scaling = cfg.lora_alpha / cfg.r

    def weight(proj, e):
        a, b = experts.factors(proj)
        return getattr(mlp, proj).weight + scaling * b[e] @ a[e]

    out = torch.zeros(x.shape[0], mlp.down_proj.out_features)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), chosen[t].tolist(), strict=True):
            if w == 0:
                continue
            h = mlp.act_fn(weight("gate_proj", e) @ x[t]) * (weight("up_proj", e) @ x[t])
            out[t] += w * (weight("down_proj", e) @ h)
    return out


def peaked(model, scale=3.0):
    """Sharpen the routers so that the hybrid rule mixes top-p tokens and broadcast tokens."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.mul_(scale)


def test_block_scope_equals_naive_formula_with_variable_expert_counts():
    cfg = dynmole(num_experts=6, top_p=0.9)  # not the default: a layer reading other settings would differ
    model = get_peft_model(tiny_base(), cfg)
    randomize_adapters(model, std=0.15)
    peaked(model, 3.0)
    model.eval()
    layer = next(m for m in model.modules() if isinstance(m, DynMoLEMLP))
    x = torch.randn(3, 8, 64) * torch.linspace(0.05, 3.0, 24).reshape(3, 8, 1)  # flat to peaked routers
    with torch.no_grad():
        fast = layer(x).reshape(-1, 64)
        slow = naive_block(layer, x.reshape(-1, 64), cfg)
        weights, _ = routing.dynmole_routing(
            torch.softmax(x.reshape(-1, 64) @ layer.routers["default"].weight.t(), -1), **rule_of(cfg))
    counts = (weights != 0).sum(-1)
    # tokens really use different numbers of experts: broadcast ones, and top-p ones beyond min_experts
    assert counts.max() == 6 and ((counts > cfg.min_experts) & (counts < 6)).any(), counts.tolist()
    assert (fast - slow).abs().max().item() <= 1e-5


def test_block_scope_dispatched_pairs_equal_naive_formula_with_gradients(monkeypatch):
    """Many tokens (> SMALL_PAIRS pairs) of sharpened routers: the block runs the blockwise pair path
    (`_mixture_pairs`, not the few-pairs or dense ones) with variable expert counts; outputs equal the formula, and
    gradients of the experts equal those through the formula."""
    from peft_mole.ops.experts import SMALL_PAIRS

    cfg = dynmole(num_experts=6, top_p=0.9)
    model = get_peft_model(tiny_base(), cfg)
    randomize_adapters(model, std=0.15)
    peaked(model, 3.0)
    model.eval()
    layer = next(m for m in model.modules() if isinstance(m, DynMoLEMLP))
    calls = []
    real = layer_module.MixLoRAMLP._mixture_pairs
    monkeypatch.setattr(layer_module.MixLoRAMLP, "_mixture_pairs",
                        lambda self, *a: calls.append(len(a[-1].token)) or real(self, *a))
    x = torch.randn(4, 30, 64) * torch.linspace(0.05, 3.0, 120).reshape(4, 30, 1)
    fast = layer(x).reshape(-1, 64)
    slow = naive_block(layer, x.reshape(-1, 64), cfg)
    assert len(calls) == 1 and calls[0] > SMALL_PAIRS and calls[0] < 0.9 * 6 * 120, calls  # dispatched, not dense
    weights, _ = routing.dynmole_routing(
        torch.softmax(x.reshape(-1, 64) @ layer.routers["default"].weight.t(), -1), **rule_of(cfg))
    counts = (weights != 0).sum(-1)
    assert counts.max() == 6 and ((counts > cfg.min_experts) & (counts < 6)).any(), counts.tolist()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    factors = [t for proj in ("gate_proj", "up_proj", "down_proj") for t in layer.experts["default"].factors(proj)]
    probe = torch.randn_like(fast)
    got = torch.autograd.grad((fast * probe).sum(), factors)
    want = torch.autograd.grad((slow * probe).sum(), factors)
    for g, w in zip(got, want, strict=True):  # fp32 sums over 120 tokens in another order: 1e-4 of the largest
        assert (g - w).abs().max() <= 1e-4 * w.abs().max(), ((g - w).abs().max(), w.abs().max())


def test_projection_scope_equals_naive_formula():
    cfg = dynmole(router_scope="projection", num_experts=5, top_p=0.9)
    model = get_peft_model(tiny_base(), cfg)
    randomize_adapters(model, std=0.15)
    peaked(model, 3.0)
    model.eval()
    proj = next(m for m in model.modules() if isinstance(m, DynMoLEProjection))
    x = torch.randn(2, 7, proj.base_layer.in_features) * torch.linspace(0.05, 3.0, 14).reshape(2, 7, 1)
    with torch.no_grad():
        fast = proj(x).reshape(-1, proj.base_layer.out_features)
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(flat @ proj.routers["default"].weight.t(), -1)
        weights, chosen = routing.dynmole_routing(probs, **rule_of(cfg))
        a, b = proj.experts["default"].factors("proj")
        s = cfg.lora_alpha / cfg.r
        slow = flat @ proj.base_layer.weight.t()
        for t in range(flat.shape[0]):
            for w, e in zip(weights[t].tolist(), chosen[t].tolist(), strict=True):
                slow[t] += w * s * b[e] @ (a[e] @ flat[t])
    assert (fast - slow).abs().max().item() <= 1e-5


@pytest.mark.parametrize("scope", ["block", "projection"])
def test_broadcast_tokens_take_the_dense_path_with_the_dispatch_paths_outputs_gradients_and_masks(monkeypatch, scope):
    """Near-uniform routers (init) send almost every token to every expert: all (token, expert) pairs are computed
    expert-major without dispatch. Same logits, gradients and dropout masks as the dispatch path, and the formula."""
    from peft_mole.ops import experts as experts_ops
    from peft_mole.tuners.mixlora import projection as projection_module

    module = layer_module if scope == "block" else projection_module
    name = "dense_gated_mixture" if scope == "block" else "dense_lora_sum"
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    model = get_peft_model(tiny_base(), dynmole(num_experts=6, lora_dropout=0.1, router_scope=scope))
    randomize_adapters(model, std=0.15)
    peaked(model, 0.05)  # near-uniform routers, as at init
    def step(pad_last, dropout=True):
        model.train(dropout)
        ids, mask, labels = batch(2, 10, pad_last=pad_last)
        torch.manual_seed(7)  # the same dropout masks on both paths
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        params = [p for p in model.parameters() if p.requires_grad]
        return out.logits.detach()[mask.bool()], torch.autograd.grad(out.loss, params)  # real tokens' logits

    for pad_last, dropout in ((0, True), (3, True), (3, False)):  # the same dropout masks on both paths
        monkeypatch.setattr(experts_ops, "DENSE_FRACTION", 0.9)
        calls.clear()
        dense_logits, dense_grads = step(pad_last, dropout)
        assert calls  # the dense path ran
        monkeypatch.setattr(experts_ops, "DENSE_FRACTION", 2.0)  # never dense: dispatch
        calls.clear()
        sparse_logits, sparse_grads = step(pad_last, dropout)
        assert not calls
        torch.testing.assert_close(dense_logits, sparse_logits, atol=1e-5, rtol=1e-5)
        for dense_grad, sparse_grad in zip(dense_grads, sparse_grads, strict=True):
            torch.testing.assert_close(dense_grad, sparse_grad, atol=1e-6, rtol=1e-4)
    if scope == "block":
        monkeypatch.setattr(experts_ops, "DENSE_FRACTION", 0.9)
        model.eval()
        layer = next(m for m in model.modules() if isinstance(m, DynMoLEMLP))
        x = torch.randn(3, 8, 64) * 0.1  # flat routers: broadcast
        calls.clear()
        with torch.no_grad():
            want = naive_block(layer, x.reshape(-1, 64), model.peft_config["default"])
            assert (layer(x).reshape(-1, 64) - want).abs().max().item() <= 1e-5
        assert calls


def test_variable_counts_dispatch_only_selected_pairs(monkeypatch):
    seen = []
    real = layer_module.shared_input_lora

    def spy(x, a, b, plan, scaling, base=None):
        seen.append((x.shape[0], len(plan.token)))
        return real(x, a, b, plan, scaling, base)

    monkeypatch.setattr(layer_module, "shared_input_lora", spy)
    model = get_peft_model(tiny_base(), dynmole(num_experts=8))
    randomize_adapters(model, std=0.15)
    peaked(model, 20.0)
    ids, mask, _ = batch(2, 10)
    model(input_ids=ids, attention_mask=mask)
    assert seen and all(2 * 10 * 2 <= pairs < 2 * 10 * 8 for tokens, pairs in seen)  # ≥ min_experts, < all


def test_aux_loss_is_entropy_plus_load_balance_over_real_tokens():
    model = get_peft_model(tiny_base(), dynmole(entropy_loss_coef=0.3, lb_loss_coef=0.2))
    randomize_adapters(model)
    peaked(model, 10.0)
    model.train()
    ids, mask, labels = batch(2, 10, pad_last=4)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    records = []
    context = model.base_model._context()
    context.token_mask, context.records = mask.bool(), records
    model.base_model.model(input_ids=ids, attention_mask=mask)
    context.records = None
    per_layer = [
        0.3 * routing.tsallis_loss(p, 1.1) + 0.2 * routing.load_balance_loss(p, s)
        for p, s in (r.counted() for r in records)
    ]
    assert len(per_layer) == 2 and all(r.counted()[0].shape[0] == int(mask.sum()) for r in records)
    torch.testing.assert_close(out.aux_loss, torch.stack(per_layer).mean())


def test_mola_layer_wise_expert_counts():
    model = get_peft_model(tiny_base(), dynmole(num_experts=[2, 6]))
    routers = [m.routers["default"].weight.shape[0] for m in model.modules() if isinstance(m, DynMoLEMLP)]
    assert routers == [2, 6]
    with pytest.raises(ValueError, match="num_experts has 3 entries but the model has 2 decoder layers"):
        get_peft_model(tiny_base(), dynmole(num_experts=[2, 4, 6]))


def test_router_scopes_cannot_be_mixed_in_one_model():
    model = get_peft_model(tiny_base(), dynmole())
    with pytest.raises(ValueError, match="another router_scope"):
        model.add_adapter("p", dynmole(router_scope="projection"))
    model = get_peft_model(tiny_base(), dynmole(router_scope="projection"))
    with pytest.raises(ValueError, match="another router_scope"):
        model.add_adapter("b", dynmole())


def test_mixlora_and_dynmole_are_distinct_peft_types():
    model = get_peft_model(tiny_base(), mixlora())
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        model.add_adapter("other", dynmole())


@pytest.mark.parametrize(("scope", "renormalize", "is_base"),
                         [("block", False, False), ("block", True, True), ("projection", False, True)])
def test_unrenormalised_top_p_weights_scale_the_frozen_mlp_in_block_scope(scope, renormalize, is_base):
    """SPEC §2's weights are the selected p, not renormalised, and block scope computes y = Σ_e w_e FFN_e (as
    MoE-PEFT does): with B = 0 a top-p token's MLP output is Σ_e w_e < 1 times the base's. `renormalize=True`, or
    projection scope (where w scales the LoRA deltas only), keep the untrained adapter the base (docs/dynmole.md)."""
    base = tiny_base()
    ids, mask, _ = batch(2, 9)
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
    config = DynMoLEConfig(num_experts=4, r=2, router_scope=scope, renormalize=renormalize, broadcast_threshold=1.0,
                           lora_dropout=0.0, router_init_std=1.0)  # every token top-p, routers far from uniform
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    difference = (got - want).abs().max().item()
    assert difference < 1e-5 if is_base else difference > 1e-3, difference
