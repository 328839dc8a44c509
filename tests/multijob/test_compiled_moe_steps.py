"""Compiled multi-job steps with MixLoRA jobs (`tuners.mixlora.per_row`): each row routed within its own job's part
of one table of every job's routers and experts gives the eager block's numbers, and one graph serves every mix."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from peft_mole import JobConfig, MultiJobTrainer
from peft_mole.forward_context import BASE_ROW
from peft_mole.multijob import MultiJobModel
from peft_mole.multijob import model as multijob_model
from peft_mole.multijob.memory import activation_bytes, step_memory
from peft_mole.tuners.mixlora import per_row as per_row_module
from tests.helpers import mixlora, one_layer_base, randomize_adapters, tiny_base
from tests.multijob.test_trainer import ALL_LINEAR, run_args

JOBS = {
    "lora": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
    "m1": mixlora(top_k=3),  # 4 experts, r 4, on gate/up/down; top-3: more slots than m3 has experts
    "m2": mixlora(num_experts=3, top_k=1, r=2, lora_alpha=6, expert_target_modules=["gate_proj", "down_proj"]),
    "m3": mixlora(num_experts=2, top_k=1),
}


def _step(model, names: list[str], seq: int, seed: int, pad: bool = True):
    """Logits, every job's aux loss and the gradients of a loss over logits and the present jobs' aux losses."""
    ids = torch.randint(3, 500, (len(names), seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad:
        mask[0, seq // 2:] = 0  # padding: its router statistics must not count
    out = model(input_ids=ids, attention_mask=mask, adapter_names=names)
    aux = out["aux_loss_per_adapter"]
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss = loss + sum(aux.values())
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return out.logits.detach(), {n: v.detach() for n, v in aux.items()}, dict(zip(named, grads, strict=True))


def _assert_same_step(got, want, tolerance: float = 1e-5) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=tolerance, atol=tolerance)
    assert got[1].keys() == want[1].keys()
    for job in want[1]:
        torch.testing.assert_close(got[1][job], want[1][job], rtol=tolerance, atol=1e-7, msg=job)
    for name, grad in want[2].items():
        other = got[2][name]
        if grad is None and other is None:  # an absent job's tensors in a block that runs eagerly in both
            continue
        if grad is None or other is None:  # eagerly an absent job's tensors get None, per row a zero gradient
            assert (grad if grad is not None else other).abs().max() == 0, name
            continue
        torch.testing.assert_close(other, grad, rtol=10 * tolerance, atol=tolerance, msg=name)


def _models(backend: str | None, base=tiny_base, **compile_kwargs):
    eager = MultiJobModel(base(), JOBS)
    randomize_adapters(eager)
    per_row = MultiJobModel(base(), JOBS)
    per_row.load_state_dict(eager.state_dict())
    if backend is None:
        per_row.__dict__["_compiled_steps"] = True  # the per-row layers, run eagerly (no compiler)
    else:
        per_row.compile_mixed_steps(backend=backend, **compile_kwargs)
    return eager.train(), per_row.train()


def test_per_row_block_equals_the_grouped_block(monkeypatch):
    """Two MixLoRA jobs of different expert counts, k, ranks and expert projections, a LoRA job and a base row,
    with padding: logits, each job's aux loss and every gradient (routers included) as the eager block gives."""
    eager, per_row = _models(backend=None)
    names = ["m1", "lora", "m2", BASE_ROW, "m1", "m3"]
    want, got = _step(eager, names, 9, 0), _step(per_row, names, 9, 0)
    _assert_same_step(got, want)
    assert want[1]["m1"] > 0 and want[1]["m2"] > 0 and want[1]["m3"] > 0
    router = "model.model.layers.0.mlp.mixlora_router.m2.weight"
    assert got[2][router].abs().max() > 1e-4  # the routers learn through the per-row path
    without_m2 = _step(per_row, ["lora", "m1"], 9, 1)
    assert set(without_m2[1]) == {"m1"}  # an absent job has no aux loss, as eagerly (its records are dropped)
    assert without_m2[2][router].abs().max() == 0  # and a zero gradient
    records = []
    real_aux = multijob_model.router_aux_loss
    monkeypatch.setattr(multijob_model, "router_aux_loss",
                        lambda rs, configs, whole=None: records.extend(rs) or real_aux(rs, configs, whole))
    per_row(input_ids=torch.randint(3, 500, (2, 5)), adapter_names=["m1", "m2"])
    assert {r.adapter for r in records} == {"m1", "m2"} and all(r.masked for r in records)  # no row read-back
    probs, _, mask = records[0].loss_inputs()
    assert mask is not None and probs.shape[0] == 10


def test_per_row_block_recomputes_its_pairs_unless_its_layer_is_checkpointed(monkeypatch):
    """The per-row block recomputes its (pairs, I) tensors in the backward (checkpointed) rather than keeping them
    (what it keeps: `test_one_graph_serves_every_mix_of_moe_jobs`); where its decoder layer is checkpointed (per
    layer, read by `compile_mixed_steps`) it leaves the recompute to the layer."""
    _, per_row = _models(backend=None)
    names = ["m1", "lora", "m2", "m1", "m3", "m2"]
    ids = torch.randint(3, 500, (len(names), 40), generator=torch.Generator().manual_seed(0))
    calls, real = [], per_row_module.checkpoint
    monkeypatch.setattr(per_row_module, "checkpoint", lambda fn, **kwargs: calls.append(1) or real(fn, **kwargs))
    blocks = [m for m in per_row.modules() if hasattr(m, "layer_checkpointed")]
    for checkpointed, expected in ((False, len(blocks)), (True, 0)):
        calls.clear()
        for block in blocks:
            block.layer_checkpointed = checkpointed
        per_row(input_ids=ids, adapter_names=names)
        assert len(calls) == expected
    model = MultiJobModel(tiny_base(), JOBS)
    model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.model.model.layers[1].gradient_checkpointing = False  # as `every_n_layers=2` leaves it
    model.compile_mixed_steps(backend="aot_eager")
    assert [b.layer_checkpointed for b in model.modules() if hasattr(b, "layer_checkpointed")] == [True, False]


def test_per_row_block_under_cpu_bf16_autocast(monkeypatch):
    """Under CPU bf16 autocast the expert products run in fp32 as the eager block's do (the frozen products in
    bf16), on rows not grouped by job. The logits agree within a few bf16 steps; the dtypes are checked on the
    products themselves (a tolerance cannot tell fp32 from bf16 expert products here)."""
    eager, per_row = _models(backend=None)
    names = ["m1", "m2", "m1", "lora"]  # m1's rows are not consecutive
    ids = torch.randint(3, 500, (4, 7), generator=torch.Generator().manual_seed(3))
    expert_dtypes, frozen_dtypes = [], []

    def spy(function):
        def recorded(*args, **kwargs):
            out = function(*args, **kwargs)
            expert_dtypes.append(out.dtype)
            return out
        return recorded

    for name in ("_job_a_products", "pairs_through_b", "grouped_lora"):  # the per-row block's expert products
        monkeypatch.setattr(per_row_module, name, spy(getattr(per_row_module, name)))
    for name, module in per_row.named_modules():
        if name.endswith("mlp.base_layer.gate_proj"):
            module.register_forward_hook(lambda _m, _i, out: frozen_dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = eager(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names).logits.float()
        got = per_row(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names).logits.float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    # 2 layers of: the routers, the gate and up A products, their B products, the down products
    assert len(expert_dtypes) == 2 * 6 and set(expert_dtypes) == {torch.float32}, expert_dtypes
    assert frozen_dtypes == [torch.bfloat16] * 2


@pytest.mark.parametrize("dynamic", [None, True])
def test_one_graph_serves_every_mix_of_moe_jobs(dynamic):
    torch._dynamo.reset()
    counters.clear()
    # Dynamo's rule on one layer; dynamic=True, the trainer's where widths vary, on two
    eager, compiled = _models(backend="aot_eager", base=tiny_base if dynamic else one_layer_base, dynamic=dynamic)
    mixes = [(["m1", "lora", "m2", "m1"], 10), (["m2", "m3", BASE_ROW, "lora"], 10), (["lora", "m1"], 14),
             (["m1", "m2", "lora", "m3"], 8)]
    graphs = []
    for seed, (names, seq) in enumerate(mixes):
        _assert_same_step(_step(compiled, names, seq, seed), _step(eager, names, seq, seed))
        graphs.append(counters["stats"]["unique_graphs"])
    # a new mix of jobs adds none; rows and length turn dynamic once, or are from the first graph with
    # `dynamic=True` (the real tokens' mask, which the MixLoRA block records with, marked too: it added a graph)
    assert graphs == ([1, 1, 1, 1] if dynamic else [1, 1, 2, 2]), graphs
    # what a forward keeps for the backward: the per-row block computes k_max pairs for every token but recomputes
    # its (pairs, I) tensors in the backward, so the compiled step keeps less than the eager grouped blocks (two
    # layers: 3.1 against 4.0 MB; 7.0 MB when it kept them)
    names = ["m1", "lora", "m2", "m1", "m3", "m2"]
    ids = torch.randint(3, 500, (len(names), 40), generator=torch.Generator().manual_seed(0))
    kept = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        with activation_bytes() as meter:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names)
        kept[name] = meter["bytes"]
    assert kept["compiled"] < 0.85 * kept["eager"], kept
    assert graphs[-1] == counters["stats"]["unique_graphs"]  # (no new graph for that step either)


def assert_compiled_training_equals_eager(jobs, tokenizer, tmp_path, **trainer_kwargs) -> MultiJobTrainer:
    """MultiJobTrainer with torch_compile=True (aot_eager: the graphs, not inductor's kernels) against eager: every
    job ends with the same adapter (1e-4), on a one-layer base. Returns the compiled run's trainer."""
    results = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        out = tmp_path / ("compiled" if compiled else "eager")
        # (a compile backend alone turns torch_compile on in TrainingArguments)
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        args = run_args(out, max_steps=3, max_length=96, **extra)
        trainer = MultiJobTrainer(model=one_layer_base(vocab_size=len(tokenizer)), jobs=jobs, args=args,
                                  processing_class=tokenizer, **trainer_kwargs)
        randomize_adapters(trainer.jobs_model, seed=2)
        counters.clear()
        trainer.train()
        assert (counters["stats"]["unique_graphs"] >= 1) == compiled  # the eager run did not compile
        assert [r["status"] for r in trainer.job_summary] == ["done"] * len(jobs)
        results[compiled] = {j.name: load_file(os.path.join(out, j.name, "adapter_model.safetensors")) for j in jobs}
    for job, tensors in results[False].items():
        for key, value in tensors.items():
            torch.testing.assert_close(results[True][job][key], value, rtol=1e-4, atol=1e-5, msg=f"{job} {key}")
    return trainer


def test_trainer_with_torch_compile_trains_moe_jobs_as_eagerly(assets, tmp_path):
    """... also under a memory budget, whose model is fitted on the compiled steps (their per-row block keeps other
    tensors than the eager one): it predicts a compiled mixed step; and the profile compiles no graph of its own."""
    tokenizer, datasets = assets
    jobs = [
        JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "down_proj"]),
                  datasets["sentiment"], per_device_train_batch_size=3),
        JobConfig("mix", mixlora(), datasets["capital"], per_device_train_batch_size=2, gradient_accumulation_steps=2),
    ]
    trainer = assert_compiled_training_equals_eager(jobs, tokenizer, tmp_path, max_memory=1e12)
    assert not trainer.jobs_model.__dict__["_dynamic_steps"]  # the profile's steps of several shapes came first
    # the decoder alone is compiled: TRL's fused LM head (tiles multiplied with `out=`) broke the graph and compiled
    # three frames per shape; the profile's steps and training share graphs (a one-row step, then dynamic sizes)
    assert not counters["graph_break"], list(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 3, counters["stats"]["unique_graphs"]  # 11 before
    model, names = trainer.jobs_model, ["lora", "mix", "mix", "lora"]
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(3, len(tokenizer), (len(names), 40), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, adapter_names=names,
                    fused_lm_head=True, use_cache=False)
        torch.autograd.grad(-out.log_probs.sum(), params, allow_unused=True)

    measured = step_memory(torch.device("cpu"), step)
    predicted = trainer.job_scheduler.memory_model.predict([40] * len(names), names)
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


def test_per_row_dropout_and_jitter_draw_per_job():
    """In training, each job's rows take its own dropout rate and router jitter (here one job with both, one with
    neither: the second job's rows give the eager block's numbers exactly, the first's do not)."""
    jobs = {"plain": mixlora(), "noisy": mixlora(lora_dropout=0.5, jitter_noise=0.2)}
    eager = MultiJobModel(tiny_base(), jobs)
    randomize_adapters(eager)
    per_row = MultiJobModel(tiny_base(), jobs)
    per_row.load_state_dict(eager.state_dict())
    per_row.__dict__["_compiled_steps"] = True
    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, model in (("eager", eager.train()), ("per_row", per_row.train())):
        torch.manual_seed(0)
        logits[name] = model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=["plain", "noisy"]).logits
    torch.testing.assert_close(logits["per_row"][0], logits["eager"][0], rtol=1e-5, atol=1e-5)
    per_row.eval()
    eager.eval()
    with torch.no_grad():
        a = per_row(input_ids=ids, adapter_names=["plain", "noisy"]).logits
        b = eager(input_ids=ids, adapter_names=["plain", "noisy"]).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # evaluation: no dropout, no jitter
    # in training, the plain job's row is its noise-free value and the noisy job's row is not
    torch.testing.assert_close(logits["per_row"][0], a[0], rtol=1e-5, atol=1e-5)
    assert (logits["per_row"][1] - a[1]).abs().max() > 1e-3


def test_per_row_block_run_eagerly_under_layer_checkpointing():
    """Where Dynamo leaves a compiled step's layers to run eagerly (disabled, or past its recompile limit) under
    the trainer's non-reentrant layer checkpointing, the recomputation saves the tensors the forward saved (the
    per-row records take their job's columns when the loss reads them, outside the layer): gradients as without
    checkpointing. Before, each routed job's record saved one more tensor in the forward than in the recompute."""
    eager, per_row = _models(backend=None)
    names = ["m1", "lora", "m2", BASE_ROW, "m1", "m3"]
    want = _step(per_row, names, 9, 0)
    per_row.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for block in (m for m in per_row.modules() if hasattr(m, "layer_checkpointed")):
        block.layer_checkpointed = True
    _assert_same_step(_step(per_row, names, 9, 0), want, tolerance=1e-6)
