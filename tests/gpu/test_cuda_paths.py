"""CUDA paths against their CPU references (issue 6, part 6). Skipped without a CUDA device (CI has none).

Each test builds the model on the CPU, copies it to the GPU, and compares: fp32 results equal the CPU's to
float tolerance; under bf16 autocast the router stays fp32, adapter gradients stay fp32, and the loss is the fp32
loss to bf16 precision. Run on a GPU machine with `python -m pytest tests/gpu` (see docs/gpu.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_mole.multijob.model import MultiJobModel
from peft_mole.ops.dense_mixture import dense_gated_mixture
from peft_mole.ops.experts import dispatch
from peft_mole.ops.gated import weighted_gated_activation
from peft_mole.ops.pair_mixture import pair_gated_mixture
from tests.helpers import batch, dynmole, mixlora, randomize_adapters, tiny_base

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIGS = {
    "mixlora": lambda: mixlora(lora_dropout=0.0),
    "dynmole_block": lambda: dynmole(num_experts=6),
    "dynmole_projection": lambda: dynmole(num_experts=6, router_scope="projection"),
}


def _loss_and_grads(model, ids, mask, labels):
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    params = [p for p in model.parameters() if p.requires_grad]
    return out.loss, out.logits, torch.autograd.grad(out.loss, params)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("router_scale", [0.05, 5.0], ids=["flat", "sharp"])  # DynMoLE: dense path / dispatch
def test_fp32_on_cuda_equals_cpu(kind, router_scale):
    cpu = get_peft_model(tiny_base(), CONFIGS[kind]())
    randomize_adapters(cpu, std=0.15)
    with torch.no_grad():
        for name, p in cpu.named_parameters():
            if "router" in name:
                p.mul_(router_scale)
    gpu = copy.deepcopy(cpu).cuda()
    ids, mask, labels = batch(4, 24, pad_last=5)
    loss, logits, grads = _loss_and_grads(cpu, ids, mask, labels)
    g_loss, g_logits, g_grads = _loss_and_grads(gpu, ids.cuda(), mask.cuda(), labels.cuda())
    torch.testing.assert_close(g_logits.cpu(), logits, atol=1e-4, rtol=1e-4)
    for g, c in zip(g_grads, grads, strict=True):
        torch.testing.assert_close(g.cpu(), c, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_bf16_autocast_keeps_router_and_adapter_gradients_fp32(kind):
    model = get_peft_model(tiny_base(), CONFIGS[kind]()).cuda()
    randomize_adapters(model, std=0.15)
    ids, mask, labels = (t.cuda() for t in batch(4, 24))
    reference, _, _ = _loss_and_grads(model, ids, mask, labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _, grads = _loss_and_grads(model, ids, mask, labels)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert abs(loss.item() - reference.item()) <= 2e-2 * abs(reference.item())


def test_gated_activation_under_cuda_autocast_matches_fp32():
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate = torch.randn(8, 64, 96, device="cuda", generator=gen, requires_grad=True)
    up = torch.randn(8, 64, 96, device="cuda", generator=gen, requires_grad=True)
    weight = torch.rand(8, 64, 1, device="cuda", generator=gen, requires_grad=True)
    act = torch.nn.GELU(approximate="tanh")
    ref = weight * act(gate) * up
    ref_grads = torch.autograd.grad(ref.square().sum(), (gate, up, weight))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = weighted_gated_activation(gate.bfloat16(), up.bfloat16(), weight, act)
    grads = torch.autograd.grad(out.float().square().sum(), (gate, up, weight))
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, atol=0.1 * float(r.abs().max()), rtol=0)


def _cuda_leaf(gen, *shape, scale=1.0):
    return (scale * torch.randn(*shape, device="cuda", generator=gen)).requires_grad_()


def _check_bf16_autocast(mixture, gate, up, weight, leaves, **run):
    """`mixture` under CUDA bf16 autocast: bf16 outputs, fp32 gradients, both close to its fp32 results."""
    ref_hidden, ref_z = mixture(gate, up, weight, **run)
    ref_grads = torch.autograd.grad(ref_hidden.square().sum() + ref_z.sum(), leaves)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden, z = mixture(gate.bfloat16(), up.bfloat16(), weight, **run)
    assert hidden.dtype == z.dtype == torch.bfloat16
    grads = torch.autograd.grad(hidden.float().square().sum() + z.float().sum(), leaves)
    scale = float(ref_hidden.detach().abs().max())
    torch.testing.assert_close(hidden.float(), ref_hidden.detach(), atol=0.05 * scale, rtol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, atol=0.1 * float(r.abs().max()), rtol=0)


def test_dense_mixture_under_cuda_autocast_runs_bf16_products_with_fp32_gradients():
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate, up, down_a = _cuda_leaf(gen, 64, 96), _cuda_leaf(gen, 64, 96), _cuda_leaf(gen, 8, 4, 96, scale=0.1)
    gate_lora = (_cuda_leaf(gen, 8, 64, 4), _cuda_leaf(gen, 8, 96, 4, scale=0.1))
    up_lora = (_cuda_leaf(gen, 8, 64, 4), _cuda_leaf(gen, 8, 96, 4, scale=0.1))
    weight = torch.rand(8, 64, 1, device="cuda", generator=gen).requires_grad_()
    _check_bf16_autocast(dense_gated_mixture, gate, up, weight, (gate, up, weight, down_a, *gate_lora, *up_lora),
                         act_fn=torch.nn.SiLU(), down_a=down_a, gate_lora=gate_lora, up_lora=up_lora, scaling=2.0)


def test_pair_mixture_under_cuda_autocast_runs_bf16_products_with_fp32_gradients():
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights, chosen = torch.rand(64, 8, device="cuda", generator=gen).softmax(-1).topk(2, dim=-1)
    plan = dispatch(weights, chosen, 8)
    m = len(plan.token)
    gate, up, down_a = _cuda_leaf(gen, 64, 96), _cuda_leaf(gen, 64, 96), _cuda_leaf(gen, 8, 4, 96, scale=0.1)
    gate_lora = (_cuda_leaf(gen, m, 4), _cuda_leaf(gen, 8, 96, 4, scale=0.1))
    up_lora = (_cuda_leaf(gen, m, 4), _cuda_leaf(gen, 8, 96, 4, scale=0.1))
    weight = plan.weight.detach().requires_grad_()
    _check_bf16_autocast(pair_gated_mixture, gate, up, weight, (gate, up, weight, down_a, *gate_lora, *up_lora),
                         act_fn=torch.nn.SiLU(), down_a=down_a, token=plan.token, counts=plan.counts,
                         gate_lora=gate_lora, up_lora=up_lora)


def test_multijob_mixed_rows_on_cuda_equal_cpu():
    jobs = {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            "lora2": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            "mix": mixlora(), "dyn": dynmole()}
    cpu = MultiJobModel(tiny_base(), jobs)
    randomize_adapters(cpu)
    gpu = copy.deepcopy(cpu).cuda()
    ids, mask, _ = batch(batch_size=8, seq_len=16, pad_last=3)
    rows = ["lora", "lora", "lora2", "lora2", "mix", "mix", "dyn", "dyn"]  # equal-size LoRA jobs: stacked
    with torch.no_grad():
        expected = cpu(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
        got = gpu(input_ids=ids.cuda(), attention_mask=mask.cuda(), adapter_names=rows).logits
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_multijob_stacked_lora_jobs_train_under_cuda_bf16_autocast():
    """Equal-size LoRA jobs share batched products; under autocast their backward meets bf16 gradients, which
    the products must take as `F.linear` does (a dtype mismatch there made every such step fall back job by
    job). Each job's gradients match the same job run alone to bf16 precision."""
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    model = MultiJobModel(tiny_base(), {"a": lora, "b": copy.deepcopy(lora)}).cuda()
    randomize_adapters(model)
    ids, mask, labels = (t.cuda() for t in batch(batch_size=4, seq_len=16))
    grads = {}
    for rows, names in ((slice(0, 4), ["a", "a", "b", "b"]), (slice(0, 2), ["a", "a"])):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids[rows], attention_mask=mask[rows], adapter_names=names)
        loss = out.logits[:2].float().logsumexp(-1).mean()  # the rows of job a only
        params = list(model.job_parameters("a").values())
        grads[len(names)] = torch.autograd.grad(loss, params)
        assert all(g.dtype == torch.float32 for g in grads[len(names)])
    for together, alone in zip(grads[4], grads[2], strict=True):
        torch.testing.assert_close(together, alone, atol=2e-2, rtol=2e-2)


def test_multijob_packed_row_on_cuda_equals_cpu():
    """A padding-free mixed step (one packed row, one adapter per token) under CUDA SDPA equals the CPU's."""
    from peft_mole.multijob.batching import packed_mixed_batch

    cpu = MultiJobModel(tiny_base(), {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
                                      "mix": mixlora(), "dyn": dynmole()})
    randomize_adapters(cpu)
    gpu = copy.deepcopy(cpu).cuda()
    gen = torch.Generator().manual_seed(0)
    parts = {}
    for job, lengths in (("lora", [5, 9]), ("mix", [12]), ("dyn", [3, 7, 4])):
        ids = torch.randint(1, 500, (1, sum(lengths)), generator=gen)
        parts[job] = {"input_ids": ids, "labels": ids.clone(),
                      "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    inputs = packed_mixed_batch(parts).model_inputs()
    on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        expected = cpu(**inputs, use_cache=False).logits
        got = gpu(**on_gpu, use_cache=False).logits
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_pair_mixture_grouped_products_on_cuda_equal_the_loop_and_the_cpu(monkeypatch):
    """bf16 expert products as `torch._grouped_mm` per block (sizes of 16-byte multiples) against the per-expert loop
    on CUDA and the fp32 CPU chain: values and gradients to bf16 precision."""
    from peft_mole.ops import pair_mixture
    from peft_mole.ops.segmented_lora import grouped_mm_serves

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm on CUDA needs compute capability 9.0 or newer")
    assert grouped_mm_serves(torch.device("cuda"), torch.bfloat16, 96, 8)
    gen = torch.Generator().manual_seed(0)
    weights, chosen = torch.rand(64, 8, generator=gen).softmax(-1).topk(2, dim=-1)
    plan = dispatch(weights, chosen, 8)
    pairs = len(plan.token)
    shapes = {"gate": (64, 96), "up": (64, 96), "down_a": (8, 8, 96), "z_gate": (pairs, 8), "b_gate": (8, 96, 8),
              "z_up": (pairs, 8), "b_up": (8, 96, 8)}
    values = {name: torch.randn(*shape, generator=gen) * (0.1 if name in ("down_a", "b_gate", "b_up") else 1.0)
              for name, shape in shapes.items()}
    calls, real_grouped_mm = [], torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real_grouped_mm(*a, **k))

    def run(device, dtype, grouped):
        monkeypatch.setattr(pair_mixture, "GROUPED_MIN_SEGMENTS", 1 if grouped else 10**9)
        t = {name: v.to(device, dtype).requires_grad_() for name, v in values.items()}
        hidden, z = pair_gated_mixture(
            t["gate"], t["up"], plan.weight.to(device, dtype), torch.nn.SiLU(), t["down_a"], plan.token.to(device),
            plan.counts, gate_lora=(t["z_gate"], t["b_gate"]), up_lora=(t["z_up"], t["b_up"]))
        grads = torch.autograd.grad(hidden.float().square().sum() + z.float().square().sum(), list(t.values()))
        return [r.detach().float().cpu() for r in (hidden, z, *grads)]

    reference = run("cpu", torch.float32, grouped=False)
    loop = run("cuda", torch.bfloat16, grouped=False)
    calls.clear()
    grouped = run("cuda", torch.bfloat16, grouped=True)
    assert calls, "the grouped path did not run"
    for got, looped, want in zip(grouped, loop, reference, strict=True):
        tolerance = 0.05 * float(want.abs().max())
        torch.testing.assert_close(got, want, atol=tolerance, rtol=0)
        torch.testing.assert_close(got, looped, atol=tolerance, rtol=0)


@pytest.mark.parametrize("kind", ["mixlora", "dynmole_projection"])  # the block's and the projection's slot paths
def test_decoding_under_cuda_graphs_gives_the_eager_tokens(kind):
    """`generate` with a static cache and CompileConfig(mode="reduce-overhead", fullgraph=True): each decoding step
    is one graph that CUDA graphs replay; the tokens are the eager model's (tests/tuners/test_compiled_decoding.py
    checks the graph and the logits on the CPU)."""
    from transformers import CompileConfig

    model = get_peft_model(tiny_base(), CONFIGS[kind]())
    randomize_adapters(model, std=0.2)
    model = model.cuda().eval()
    ids = torch.randint(3, 500, (8, 6), generator=torch.Generator().manual_seed(0)).cuda()
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                    pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(input_ids=ids, **settings)
        compiled = model.generate(input_ids=ids, cache_implementation="static",
                                  compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"), **settings)
        again = model.generate(input_ids=ids, cache_implementation="static",
                               compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"), **settings)
    assert torch.equal(compiled, eager) and torch.equal(again, eager)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_compiled_training_step_on_cuda_equals_eager(kind, autocast):
    """Inductor's CUDA (Triton) code for a training forward and backward, the segment operators (bf16 grouped
    products under autocast) and the masked aux loss inside: the eager loss and gradients (more tokens than the
    compiled slot path takes: dispatch). Under bf16 autocast both steps are compared with the fp32 eager step: bf16
    rounding moves some tokens' routing, which moves single gradients of this tiny model by up to 28 % in the eager
    step alone (H200, 2026-12-04; compiled there: up to 17 %). On the CPU, run alike, the compiled DynMoLE step's
    distance from fp32 was 2.2x the eager step's, its worst gradient 51 % off. Hence the bounds: 3x the eager
    distance, and a missing, doubled or sign-flipped gradient (off by its own norm or more) fails. Smaller errors are
    the fp32 variant's to catch, which compares compiled with eager to 1e-5."""
    model = get_peft_model(tiny_base(), CONFIGS[kind]()).cuda()
    randomize_adapters(model, std=0.15)
    model.train()
    ids, mask, labels = (t.cuda() for t in batch(3, 100, pad_last=5))

    def run(m, bf16=autocast):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            return _loss_and_grads(m, ids, mask, labels)

    loss, _, grads = run(model)
    c_loss, _, c_grads = run(torch.compile(model))
    torch.testing.assert_close(c_loss, loss, atol=1e-2 if autocast else 1e-4, rtol=1e-4)
    if not autocast:
        for c, e in zip(c_grads, grads, strict=True):
            torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-3)
        return
    _, _, reference = run(model, bf16=False)

    def distance(got):
        return torch.cat([(g - r).flatten() for g, r in zip(got, reference, strict=True)]).norm()

    scale = torch.cat([r.flatten() for r in reference]).norm()
    assert distance(c_grads) <= 3 * distance(grads) + 0.05 * scale
    for c, r in zip(c_grads, reference, strict=True):
        # (the floor: an expert that a flipped token reaches only in bf16 has a zero fp32 gradient)
        assert c.dtype == torch.float32 and (c - r).norm() <= 0.75 * r.norm() + 0.02 * scale


def test_layer_stats_take_cpu_inputs_for_a_model_on_cuda():
    """`diagnostics.layer_stats` (the examples' router printout) moves its inputs to the model's device, and gives
    the CPU model's statistics (it gave a device mismatch in the embedding)."""
    from peft_mole.diagnostics import layer_stats

    model = get_peft_model(tiny_base(), mixlora(lora_dropout=0.0))
    randomize_adapters(model)
    ids, mask, _ = batch(2, 8)
    on_cpu = layer_stats(model, ids, mask)
    on_cuda = layer_stats(copy.deepcopy(model).cuda(), ids, mask)
    assert on_cpu.keys() == on_cuda.keys()
    for layer, stats in on_cpu.items():
        torch.testing.assert_close(torch.tensor(on_cuda[layer].load), torch.tensor(stats.load), atol=1e-5, rtol=0)
