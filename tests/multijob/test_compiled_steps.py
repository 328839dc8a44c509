"""Compiled multi-job steps: one graph for every mix of LoRA jobs and rows, with the eager step's numbers."""

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
from peft_mole.multijob.batching import widths_differ
from peft_mole.ops.dropout import Dropout
from peft_mole.ops.indexed_lora import indexed_lora_delta, per_row_dropout
from peft_mole.ops.segmented_lora import LoraFactors, lora_delta
from tests.helpers import one_layer_base, randomize_adapters, recording_backend, tiny_base
from tests.multijob.test_trainer import ALL_LINEAR, run_args


def factors(rank: int, seed: int, scaling: float, dropout=None) -> LoraFactors:
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(rank, 12, generator=gen, requires_grad=True),
                       torch.randn(10, rank, generator=gen, requires_grad=True), scaling,
                       dropout or torch.nn.Identity())


def test_indexed_delta_is_each_rows_own_lora():
    """Ranks 2 and 4 (padded), a job without a LoRA here (None) and a base-only row: each row's delta and every
    factor's gradient are those of the row's own job computed alone."""
    jobs = [factors(2, 0, 0.5), None, factors(4, 1, 2.0)]
    x = torch.randn(5, 3, 12, requires_grad=True)
    row_jobs = torch.tensor([2, 0, 3, 1, 2])  # 3 = base-only, 1 = no LoRA on this layer
    out = indexed_lora_delta(x, row_jobs, jobs)
    expected = torch.stack([lora_delta(x[i], jobs[j].lora_a, jobs[j].lora_b, jobs[j].scaling, jobs[j].dropout)
                            if j in (0, 2) else torch.zeros(3, 10) for i, j in enumerate(row_jobs.tolist())])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert out[2].eq(0).all() and out[3].eq(0).all()
    weights = torch.randn_like(out)
    tensors = [x, jobs[0].lora_a, jobs[0].lora_b, jobs[2].lora_a, jobs[2].lora_b]
    got = torch.autograd.grad((out * weights).sum(), tensors)
    want = torch.autograd.grad((expected * weights).sum(), tensors)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)  # magnitudes ~10: rounding of other sums
    assert got[0][2:4].eq(0).all()  # base-only and LoRA-less rows: no gradient into x through an adapter
    assert indexed_lora_delta(x, row_jobs, [None, None, None]) is None


def test_each_row_takes_its_own_jobs_dropout():
    torch.manual_seed(0)
    kept, dropped = factors(2, 0, 1.0), factors(2, 1, 1.0, Dropout(0.5))
    x = torch.ones(4, 64, 12)
    out = per_row_dropout(x, torch.tensor([0, 1, 2, 1]), [kept.dropout, dropped.dropout])
    assert out[0].eq(1).all() and out[2].eq(1).all()  # no dropout: the job's own rows and the base row
    for row in (1, 3):
        values = set(out[row].unique().tolist())
        assert values <= {0.0, 32768 / (32768 - 16384)} and 0.3 < out[row].eq(0).float().mean() < 0.7


def two_models(jobs: dict[str, LoraConfig], backend: str = "aot_eager", **compile_kwargs):
    """An eager and a compiled model of one decoder layer, with the same adapters (two layers: the checkpointed
    layers' test)."""
    eager = MultiJobModel(one_layer_base(), jobs)
    randomize_adapters(eager)
    compiled = MultiJobModel(one_layer_base(), jobs)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_mixed_steps(backend=backend, **compile_kwargs)
    return eager.train(), compiled.train()


def loss_and_grads(model, names: list[str], seq: int, seed: int):
    ids = torch.randint(3, 500, (len(names), seq), generator=torch.Generator().manual_seed(seed))
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return loss, dict(zip(named, grads, strict=True))


@pytest.mark.parametrize("dynamic", [None, True])
def test_one_graph_serves_every_mix_of_jobs_with_the_eager_numbers(dynamic):
    torch._dynamo.reset()
    counters.clear()
    configs = {"a": LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR),
               "b": LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),  # another rank, fewer layers
               "c": LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=ALL_LINEAR)}
    eager, compiled = two_models(configs, dynamic=dynamic)
    mixes = [(["a", "b", "c", "a"], 16), (["c", "c", BASE_ROW, "b"], 16),  # a new mix, same shape: same graph
             (["b", "a"], 24), (["a", "c", "b"], 12), (["c", "a", "a", "b", "b"], 20)]
    graphs = []
    for seed, (names, seq) in enumerate(mixes):
        want_loss, want = loss_and_grads(eager, names, seq, seed)
        got_loss, got = loss_and_grads(compiled, names, seq, seed)
        graphs.append(counters["stats"]["unique_graphs"])
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        for name, grad in want.items():
            if grad is None:  # a job absent from the step: the compiled step gives it a zero gradient
                assert got[name] is None or got[name].eq(0).all(), name
            else:
                torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Dynamo's rule: one recompile when rows and length first change (they turn dynamic), none for any mix after
    # that; `dynamic=True`: rows and length dynamic from the first graph, which serves every step
    assert graphs == ([1, 1, 1, 1, 1] if dynamic else [1, 1, 2, 2, 2])


def test_the_trainer_takes_compiled_steps_dynamic_where_the_jobs_micro_batches_differ_in_width():
    """The rule MultiJobTrainer applies to its first round (`widths_differ`): padded or packed micro-batches of
    several widths make steps of several shapes; one width (one job in the round, data of one length) leaves Dynamo's
    rule."""
    def padded(rows, seq):
        return {"input_ids": torch.zeros(rows, seq, dtype=torch.long), "attention_mask": torch.ones(rows, seq)}

    def packed(tokens):
        return {"input_ids": torch.zeros(1, tokens, dtype=torch.long), "position_ids": torch.arange(tokens)[None]}

    assert widths_differ([padded(2, 8), padded(3, 12)]) and widths_differ([packed(20), packed(31)])
    assert not widths_differ([padded(2, 8), padded(3, 8)]) and not widths_differ([padded(4, 9)])
    assert not widths_differ([packed(20), packed(20)])


def test_the_trainer_keeps_dynamos_rule_where_the_first_rounds_micro_batches_are_of_one_width(assets, tmp_path,
                                                                                              monkeypatch):
    """Micro-batches padded to one width (`pad_to_multiple_of` = `max_length`): `widths_differ` is false on the first
    round, so the compiled steps keep Dynamo's rule (`test_trainer_with_torch_compile_trains_as_eagerly`: the other
    branch), and the jobs train."""
    tokenizer, datasets = assets
    jobs = [JobConfig("a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), datasets["sentiment"],
                      per_device_train_batch_size=3),
            JobConfig("b", LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"]), datasets["capital"],
                      per_device_train_batch_size=2)]
    args = run_args(tmp_path, torch_compile=True, torch_compile_backend="eager", pad_to_multiple_of=40)
    trainer = MultiJobTrainer(model=one_layer_base(vocab_size=len(tokenizer)), jobs=jobs, args=args,
                              processing_class=tokenizer)
    widths, train_round = [], trainer._train_round
    trainer._train_round = lambda parts: widths.append([b["input_ids"].shape[1] for _, b in parts]) or train_round(
        parts)
    decided, decide = [], MultiJobModel.dynamic_steps
    monkeypatch.setattr(MultiJobModel, "dynamic_steps", lambda self, dynamic: decided.append(dynamic) or decide(
        self, dynamic))
    torch._dynamo.reset()
    counters.clear()
    trainer.train()
    assert widths[0] == [40, 40] and decided == [False, False]  # compile_mixed_steps, then the first round
    assert trainer.jobs_model.__dict__["_compiled_steps"] and not trainer.jobs_model.__dict__["_dynamic_steps"]
    assert counters["stats"]["unique_graphs"] >= 1
    assert [r["status"] for r in trainer.job_summary] == ["done", "done"]


def test_compiled_steps_without_dynamic_shapes_compile_each_shape():
    """`dynamic=False` reaches torch.compile: a graph per shape, none of them dynamic (the steps' marks are off), also
    after other models' steps of the same rows, under Dynamo's rule and with `dynamic=True`. Their dynamic graphs
    gave the job indices they saved dynamic sizes (AOTAutograd's unguarded `_dynamo_propagated_dynamic_indices`),
    which a cached tensor of job indices carried to this model's steps until 2026-12-07 (and so would marks)."""
    for dynamic in (None, True):
        torch._dynamo.reset()
        earlier = MultiJobModel(one_layer_base(), {"a": LoraConfig(r=4, target_modules=["q_proj"])})
        earlier.compile_mixed_steps(backend="aot_eager", dynamic=dynamic)
        for rows, seq in ((3, 8), (4, 10), (2, 12), (3, 14)):  # (None: a static graph, then a dynamic one)
            loss_and_grads(earlier.train(), ["a"] * rows, seq, 0)
    torch._dynamo.reset()
    graphs = []
    model = MultiJobModel(tiny_base(), {"a": LoraConfig(r=4, target_modules=["q_proj"])})
    model.compile_mixed_steps(backend=recording_backend(graphs), dynamic=False)
    for rows, seq in ((2, 8), (3, 10), (4, 12)):
        loss_and_grads(model.train(), ["a"] * rows, seq, 0)
    assert len(graphs) == 3 and not model.__dict__["_dynamic_steps"]
    for graph in graphs:
        inputs = [node.meta["example_value"] for node in graph.graph.nodes if node.op == "placeholder"]
        assert not any(isinstance(size, torch.SymInt) for value in inputs if isinstance(value, torch.Tensor)
                       for size in value.shape)


def test_checkpointed_layers_are_compiled_too():
    """Under activation checkpointing (TRL's default) Dynamo runs the layers eagerly unless told not to replay
    transformers' forward side effect in the recompute; the compiled steps tell it, so the LoRA layers' products
    are in the graph, with the eager step's numbers (on two layers: the LoRA steps' two-layer compiled case)."""
    torch._dynamo.reset()
    graphs = []
    configs = {"a": LoraConfig(r=4, target_modules=ALL_LINEAR), "b": LoraConfig(r=4, target_modules=ALL_LINEAR)}
    models = []
    for compiled in (False, True):
        base = tiny_base()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = MultiJobModel(base, configs)
        randomize_adapters(model)
        if compiled:
            model.compile_mixed_steps(backend=recording_backend(graphs))
        models.append(model.train())
    want_loss, want = loss_and_grads(models[0], ["a", "b", "b"], 10, 0)
    got_loss, got = loss_and_grads(models[1], ["a", "b", "b"], 10, 0)
    traced = {str(node.target) for graph in graphs for sub in graph.modules() if isinstance(sub, torch.fx.GraphModule)
              for node in sub.graph.nodes}
    assert "<built-in method bmm of type object at" in " ".join(traced)  # the per-row LoRA products were traced
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])  # True: TRL's default
def test_trainer_with_torch_compile_trains_as_eagerly(assets, tmp_path, checkpointing):
    """`torch_compile=True`: the compiled mixed steps (aot_eager here: the graphs, not inductor's kernels) give every
    job the adapter the eager MultiJobTrainer gives it, with and without activation checkpointing."""
    tokenizer, datasets = assets
    torch._dynamo.reset()

    def jobs():
        return [JobConfig("a", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                          datasets["sentiment"], per_device_train_batch_size=3),
                JobConfig("b", LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                          datasets["capital"], per_device_train_batch_size=2, max_steps=4)]

    adapters = {}
    for compiled in (False, True):
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        args = run_args(tmp_path / str(compiled), gradient_checkpointing=checkpointing, **extra)
        trainer = MultiJobTrainer(model=one_layer_base(vocab_size=len(tokenizer)), jobs=jobs(), args=args,
                                  processing_class=tokenizer)
        randomize_adapters(trainer.jobs_model)
        counters.clear()
        trainer.train()
        assert [r["status"] for r in trainer.job_summary] == ["done", "done"]
        # the steps ran compiled, in one graph: the jobs' micro-batches differ in width, so the rows and the length
        # are dynamic from the first graph (Dynamo's rule: a static graph first, then a dynamic one)
        assert counters["stats"]["unique_graphs"] == int(compiled)
        assert trainer.jobs_model.__dict__.get("_compiled_steps", False) == compiled
        assert trainer.jobs_model.__dict__.get("_dynamic_steps", False) == compiled
        adapters[compiled] = {job: load_file(os.path.join(args.output_dir, job, "adapter_model.safetensors"))
                              for job in ("a", "b")}
    for job, eager in adapters[False].items():
        for key, value in eager.items():
            torch.testing.assert_close(adapters[True][job][key], value, rtol=1e-4, atol=1e-5, msg=f"{job}: {key}")


def test_rows_assigned_anew_forget_the_compiled_steps_row_jobs():
    """`generate` (PEFT's hook) assigns rows without the tuner's forward: the last step's job indices must not stay."""
    model = MultiJobModel(tiny_base(), {"a": LoraConfig(r=4, target_modules=["q_proj"])})
    model.compile_mixed_steps(backend="aot_eager")
    ids = torch.randint(3, 500, (2, 6))
    model(input_ids=ids, adapter_names=["a", BASE_ROW])
    context = model._context()
    assert context.row_jobs.tolist() == [0, 1]
    context.set_row_adapters(["a", "a", "a"], by_hook=True)
    assert context.row_jobs is None
    model.compile_mixed_steps(backend="aot_eager", dynamic=None)  # the same as not given: no error
    with pytest.raises(ValueError, match="cannot compile again with"):
        model.compile_mixed_steps(backend="inductor")
