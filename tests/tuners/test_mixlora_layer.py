"""MixLoRA MLP layer: exactness of the shared-frozen-weight computation, dispatch, padding, mixed adapters."""

import math

import pytest
import torch
from peft import get_peft_model

from peft_mole import MixLoRAConfig
from peft_mole.tuners.mixlora import MixLoRAMLP
from peft_mole.tuners.mixlora import layer as layer_module
from tests.helpers import METHODS, batch, mixlora, randomize_adapters, tiny_base


def naive_mixture(layer: MixLoRAMLP, x: torch.Tensor, config: MixLoRAConfig, adapter: str = "default") -> torch.Tensor:
    """SPEC §1 written out token by token: y = Σ_{e∈topk} w_e W2_e(σ(W1_e x) ⊙ W3_e x), W_e = W + s·B_e A_e, with k
    and s = α / r (α / √r with rsLoRA) taken from the config, not from the layer under test."""
    mlp = layer.base_layer
    experts = layer.mixlora_experts[adapter]
    router = layer.mixlora_router[adapter].weight
    k = config.top_k
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)

    def expert_weight(proj, e):
        base = getattr(mlp, proj)
        factors = experts.factors(proj)
        if factors is None:
            return base.weight
        a, b = factors
        weight = base.weight + scaling * b[e] @ a[e]
        if experts.use_dora:  # DoRA: m ⊙ W' / ‖W'‖_row (the bias stays unscaled)
            magnitude = getattr(experts, f"{proj}_magnitude")[e]
            weight = magnitude[:, None] * weight / weight.norm(dim=1, keepdim=True)
        return weight

    out = torch.zeros(x.shape[0], mlp.down_proj.out_features)
    for t in range(x.shape[0]):
        probs = torch.softmax(router @ x[t], dim=-1)
        top = sorted(range(len(probs)), key=lambda i: -float(probs[i]))[:k]
        total = sum(float(probs[i]) for i in top)
        for e in top:
            w1, w3, w2 = (expert_weight(p, e) for p in ("gate_proj", "up_proj", "down_proj"))
            b1, b3 = (getattr(mlp, p).bias for p in ("gate_proj", "up_proj"))
            g, u = w1 @ x[t], w3 @ x[t]
            if b1 is not None:
                g, u = g + b1, u + b3
            h = mlp.act_fn(g) * u
            y = w2 @ h
            if mlp.down_proj.bias is not None:
                y = y + mlp.down_proj.bias
            out[t] += float(probs[e]) / total * y
    return out


def mlp_layers(model):
    return [m for m in model.modules() if isinstance(m, MixLoRAMLP)]


@pytest.mark.parametrize(
    "config, mlp_bias",
    [
        (dict(), False),
        (dict(expert_target_modules=["up_proj"]), False),
        (dict(expert_target_modules=["gate_proj", "down_proj"], top_k=1), False),
        (dict(num_experts=5, top_k=3), True),
        (dict(use_dora=True), False),
        (dict(use_dora=True, expert_target_modules=["down_proj"], num_experts=3), True),
        (dict(use_dora=True), True),  # DoRA scales W + s·BA, not the bias
    ],
)
# 14 tokens dispatch (a few pairs), 80 dispatch in expert segments (over 64 pairs), 4 take slot_lora
@pytest.mark.parametrize("seq_len", [7, 40, 2], ids=["dispatch", "segments", "slot_path"])
def test_shared_frozen_weights_equal_naive_per_expert_formula(config, mlp_bias, seq_len):
    base = tiny_base(mlp_bias=mlp_bias)
    if mlp_bias:  # transformers initialises biases to 0, which would hide bias handling
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.2)
    peft_config = mixlora(**config)
    model = get_peft_model(base, peft_config)
    randomize_adapters(model, std=0.1)
    model.eval()
    layer = mlp_layers(model)[0]
    x = torch.randn(2, seq_len, 64)
    with torch.no_grad():
        fast = layer(x).reshape(-1, 64)
        slow = naive_mixture(layer, x.reshape(-1, 64), peft_config)
    assert (fast - slow).abs().max().item() <= 1e-5


def test_only_selected_pairs_are_computed(monkeypatch):
    """Expert LoRA runs on tokens×k rows (sorted by expert), never tokens×E."""
    rows_seen = []
    real_grouped, real_shared = layer_module.grouped_lora, layer_module.shared_input_lora

    def spy_grouped(x, a, b, plan, scaling):
        rows_seen.append((x.shape[0], sum(plan.counts)))
        return real_grouped(x, a, b, plan, scaling)

    def spy_shared(x, a, b, plan, scaling, base=None):
        rows_seen.append((len(plan.token), sum(plan.counts)))
        return real_shared(x, a, b, plan, scaling, base)

    monkeypatch.setattr(layer_module, "grouped_lora", spy_grouped)
    monkeypatch.setattr(layer_module, "shared_input_lora", spy_shared)
    model = get_peft_model(tiny_base(), mixlora(num_experts=8, top_k=2))
    ids, mask, _ = batch(2, 10)
    model(input_ids=ids, attention_mask=mask)
    assert len(rows_seen) == 2 * 3  # two layers x (gate, up, down)
    assert all(rows == counted == 2 * 10 * 2 for rows, counted in rows_seen)


def test_padding_counts_in_no_router_statistic():
    model = get_peft_model(tiny_base(), mixlora())
    randomize_adapters(model)
    model.train()
    ids, mask, labels = batch(2, 12, pad_last=5)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    other_pads = ids.clone()
    other_pads[0, -5:] = torch.randint(3, 512, (5,))
    out2 = model(input_ids=other_pads, attention_mask=mask, labels=labels)
    assert out.aux_loss.item() == pytest.approx(out2.aux_loss.item(), abs=1e-7)
    assert out.loss.item() == pytest.approx(out2.loss.item(), abs=1e-6)
    # and without the mask the pads would count (the test can fail)
    out3 = model(input_ids=other_pads, attention_mask=torch.ones_like(mask), labels=labels)
    assert out3.aux_loss.item() != pytest.approx(out.aux_loss.item(), abs=1e-7)


def test_mixed_batch_gradients_reach_only_the_rows_adapter():
    model = get_peft_model(tiny_base(), mixlora())
    model.add_adapter("other", mixlora())
    model.base_model.set_adapter(["default", "other"])
    randomize_adapters(model)
    ids, mask, labels = batch(2, 8)
    out = model(input_ids=ids[:1], attention_mask=mask[:1], labels=labels[:1], adapter_names=["other"])
    out.loss.backward()
    for name, p in model.named_parameters():
        if ".default" in name and p.requires_grad:
            assert p.grad is None or p.grad.abs().sum() == 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".other" in n)


def test_adapter_names_are_checked():
    model = get_peft_model(tiny_base(), mixlora())
    ids, mask, _ = batch(2, 5)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        model(input_ids=ids, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2 rows"):
        model(input_ids=ids, adapter_names=["default"] * 3)
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        model(input_ids=ids, adapter_names="default")


def test_model_without_gated_mlp_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32))
    with pytest.raises(ValueError, match="needs a decoder with gated MLP blocks"):
        get_peft_model(base, MixLoRAConfig())


def test_layers_to_transform_and_expert_subset():
    model = get_peft_model(tiny_base(), mixlora(layers_to_transform=[1], attn_target_modules=["q_proj"],
                                                expert_target_modules=["up_proj"]))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".layers.1." in n for n in names)
    assert not any("k_proj" in n for n in names)
    experts = {n for n in names if "mixlora_experts" in n}
    assert experts and all("up_proj" in n for n in experts), experts  # no gate or down experts
    with pytest.raises(ValueError, match=r"layers_to_transform=\[5\] matches no decoder layer"):
        get_peft_model(tiny_base(), mixlora(layers_to_transform=[5]))
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0, 5\]: layers \[5\] hold no target module; the "
                                         r"targets are in layers \[0, 1\]"):  # (before: layer 0 alone, silently)
        get_peft_model(tiny_base(), mixlora(layers_to_transform=[0, 5]))


def test_router_stays_fp32_under_bf16():
    model = get_peft_model(tiny_base().to(torch.bfloat16), mixlora())
    layer = mlp_layers(model)[0]
    assert layer.mixlora_router["default"].weight.dtype == torch.float32
    ids, mask, labels = batch(2, 6)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert layer.mixlora_router["default"].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("method", ["mixlora", "dynmole", "dynmole-projection"])
def test_bf16_base_decoding_token_by_token_gives_the_batch_outputs(method):
    """A bf16 base with fp32 adapters (PEFT's default): the block adds each expert delta to the frozen output in
    fp32 and rounds once, on every path, so one token at a time (decoding's slots) gives what the 128-token batch
    (dispatched pairs, or every pair) gives. Left: one-bf16-step flips where the fp32 products of the two paths
    differ in their last bit (0.1 % of the outputs; before, with the slots' deltas rounded before the sum: 67 %)."""
    model = get_peft_model(tiny_base().to(torch.bfloat16), METHODS[method]())
    randomize_adapters(model, std=0.05)
    model.eval()
    block = model.base_model.model.model.layers[0].mlp
    x = torch.randn(1, 128, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    x = x.to(torch.bfloat16)
    with torch.no_grad():
        whole = block(x)
        one_by_one = torch.cat([block(x[:, t : t + 1]) for t in range(x.shape[1])], dim=1)
    assert whole.dtype == torch.bfloat16
    differ = one_by_one != whole
    assert differ.float().mean().item() < 0.01
    ulp = torch.finfo(torch.bfloat16).eps * whole.float().abs().clamp(min=2**-126)
    assert ((one_by_one.float() - whole.float()).abs() <= ulp * 1.01)[differ].all()  # one bf16 step at most


def test_dora_magnitudes_train_are_saved_and_reload_exactly(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    model = get_peft_model(tiny_base(), mixlora(use_dora=True))
    layer = mlp_layers(model)[0]
    experts = layer.mixlora_experts["default"]
    weight = layer.base_layer.up_proj.weight
    # at init (B = 0) the magnitude is ‖W‖_row and DoRA is the identity on the frozen weights
    torch.testing.assert_close(experts.up_proj_magnitude[0], weight.norm(dim=1))
    torch.testing.assert_close(experts.dora_scale("up_proj", weight), torch.ones(4, weight.shape[0]))
    randomize_adapters(model, std=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.add_(1.0)  # keep magnitudes positive
    ids, mask, labels = batch(2, 6)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert experts.up_proj_magnitude.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum("magnitude" in k for k in saved) == 2 * 3  # two layers x gate/up/down
    again = PeftModel.from_pretrained(tiny_base(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, expected)


def test_dora_row_norm_expansion_equals_the_direct_norm():
    model = get_peft_model(tiny_base(), mixlora(use_dora=True))
    randomize_adapters(model, std=0.2)
    experts = mlp_layers(model)[0].mixlora_experts["default"]
    weight = mlp_layers(model)[0].base_layer.gate_proj.weight
    a, b = experts.factors("gate_proj")
    direct = torch.stack([(weight + experts.scaling * b[e] @ a[e]).norm(dim=1) for e in range(a.shape[0])])
    torch.testing.assert_close(experts.gate_proj_magnitude / experts.dora_scale("gate_proj", weight), direct)


# every slot computed, as on a GPU: DynMoLE only (a top-k rule fills every slot, so `used_slots` drops none there)
@pytest.mark.parametrize(("method", "all_slots"), [("mixlora", False), ("mixdora", False), ("dynmole", False),
                                                   ("dynmole-projection", False), ("dynmole", True),
                                                   ("dynmole-projection", True)])
def test_few_token_path_equals_the_dispatch_path(method, all_slots, monkeypatch):
    """Decoding-sized inputs skip the sort (`slot_lora`); outputs and gradients equal the dispatch path's, also when
    every slot is computed (`used_slots` drops the unused ones only on the CPU)."""
    import peft_mole.ops.experts as experts_module
    import peft_mole.tuners.mixlora.layer as layer_module
    import peft_mole.tuners.mixlora.projection as projection_module

    if all_slots:
        for module in (layer_module, projection_module):
            monkeypatch.setattr(module, "used_slots", lambda weights, chosen: (weights, chosen))
    results = []
    for few_tokens in (64, 0):  # all take the slot path, then none does
        monkeypatch.setattr(experts_module, "FEW_TOKENS", few_tokens)
        model = get_peft_model(tiny_base(), METHODS[method]())
        randomize_adapters(model, std=0.2)
        model.train()
        ids, mask, labels = batch(2, 3)  # 3 tokens per row: each layer sees at most 6 tokens
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        results.append((out.logits.detach(), grads))
    (fast, fast_grads), (slow, slow_grads) = results
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == slow_grads.keys() and len(fast_grads) > 0
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("targets", [None, ["gate_proj", "down_proj"]], ids=["gate_up_down", "gate_down"])
def test_blockwise_pair_path_equals_the_step_by_step_path_in_training(targets, monkeypatch):
    """More than SMALL_PAIRS pairs with down experts take `ops.pair_mixture`; with dropout on, outputs, gradients and
    the drawn masks equal those of the step-by-step path (`_gate_up_experts` / `_down_experts`)."""
    from peft_mole.ops import gated

    calls, real = [], layer_module.pair_gated_mixture
    monkeypatch.setattr(layer_module, "pair_gated_mixture", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(gated, "CHUNK_ELEMENTS", 3 * 172)  # blocks of 3 pairs: several per expert segment, some spanning two experts
    results = []
    for small_pairs in (64, 10**9):  # blockwise, then step by step
        monkeypatch.setattr(layer_module, "SMALL_PAIRS", small_pairs)
        kwargs = {} if targets is None else {"expert_target_modules": targets}
        model = get_peft_model(tiny_base(), mixlora(lora_dropout=0.1, **kwargs))
        randomize_adapters(model, std=0.2)
        model.train()
        ids, mask, labels = batch(2, 24, pad_last=5)  # 48 tokens, 96 pairs per layer
        torch.manual_seed(3)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((out.logits.detach(), torch.autograd.grad(out.loss, params)))
        assert bool(calls) == (small_pairs == 64)
        calls.clear()
    (fast, fast_grads), (slow, slow_grads) = results
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(fast_grad, slow_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["training_dispatch", "eval_slot_path"])
@pytest.mark.parametrize("method", ["mixlora", "mixdora", "dynmole", "dynmole-projection"])
def test_an_empty_sequence_gives_empty_outputs_and_gradients(method, training):
    """No tokens: dispatch (training with dropout) and the few-token path (eval) return empty outputs."""
    model = get_peft_model(tiny_base(), METHODS[method](lora_dropout=0.1))
    model.train(training)
    layer = next(m for m in model.modules() if hasattr(m, "route"))
    x = torch.randn(2, 0, 64, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape[:2] == (2, 0) and x.grad.shape == (2, 0, 64)


@pytest.mark.parametrize("std", [0.02, 0.05])
def test_router_weights_start_as_spec_says(std):
    """SPEC §1: router weights N(0, 0.02²) (`router_init_std`), no bias; other tests compare paths with each
    other, so a wrong std (0.2) or a uniform init would pass them. 8 experts × 64 × 2 layers: 1024 draws, the
    sample std within 10 % of `std`, the mean within 4 standard errors of 0."""
    assert MixLoRAConfig().router_init_std == 0.02  # the SPEC's default
    torch.manual_seed(0)
    model = get_peft_model(tiny_base(), mixlora(num_experts=8, router_init_std=std))
    routers = [layer.mixlora_router["default"] for layer in mlp_layers(model)]
    assert all(router.bias is None for router in routers)
    weights = torch.cat([router.weight.detach().reshape(-1) for router in routers])
    assert weights.numel() >= 1024
    assert abs(weights.std().item() - std) <= 0.1 * std
    assert abs(weights.mean().item()) <= 4 * std / weights.numel() ** 0.5


def test_jitter_multiplies_the_router_input_only_by_a_factor_in_one_plus_minus_eps(monkeypatch):
    """SPEC §1: x · U(1−ε, 1+ε) goes into the router, in training only; the experts take x itself. The router's
    input is caught; then, with the router's probabilities of that jittered call replayed, a call without jitter
    gives the same output: the experts saw the unjittered x."""
    eps = 0.3
    model = get_peft_model(tiny_base(), mixlora(jitter_noise=eps, lora_dropout=0.0))
    randomize_adapters(model)
    layer = mlp_layers(model)[0]
    x = torch.randn(1, 6, layer.base_layer.gate_proj.in_features)
    seen, probabilities = [], layer._router_probabilities

    def catching(adapter, router_input):
        seen.append(router_input.detach().clone())
        return probabilities(adapter, router_input)

    monkeypatch.setattr(layer, "_router_probabilities", catching)
    model.train()
    with torch.no_grad():
        jittered_out = layer(x)
    ratio = seen[0] / x.reshape(-1, x.shape[-1])
    assert ratio.min() >= 1 - eps and ratio.max() <= 1 + eps and ratio.std() > eps / 4  # spread, not constant
    replayed = probabilities("default", seen[0])
    monkeypatch.setattr(layer, "_router_probabilities", lambda adapter, router_input: replayed)
    model.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), jittered_out)
    seen.clear()
    monkeypatch.setattr(layer, "_router_probabilities", catching)
    with torch.no_grad():
        layer(x)
    assert torch.equal(seen[0], x.reshape(-1, x.shape[-1]))  # in eval: no jitter
