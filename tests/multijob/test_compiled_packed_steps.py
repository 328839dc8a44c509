"""Compiled multi-job steps on packed batches (TRL's padding-free steps: one row, one adapter per token): the job
of each token is data, each job's tokens meet its own factors in one segment product, and the numbers are the eager
packed step's."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from peft_mole import JobConfig, MultiJobTrainer
from peft_mole.forward_context import BASE_ROW, PackedSegments
from peft_mole.multijob import MultiJobModel
from peft_mole.multijob.batching import mix, packed_mixed_batch
from peft_mole.ops.indexed_lora import indexed_lora_delta, packed_lora_delta
from peft_mole.ops.segmented_lora import LoraFactors
from tests.helpers import dynmole, mixlora, one_layer_base, randomize_adapters, tiny_base
from tests.multijob.test_compiled_moe_steps import JOBS, _assert_same_step
from tests.multijob.test_padding_free import packed_part
from tests.multijob.test_trainer import ALL_LINEAR, run_args


def _factors(rank: int, scaling: float, p: float, seed: int) -> LoraFactors:
    gen = torch.Generator().manual_seed(seed)
    dropout = torch.nn.Dropout(p) if p else torch.nn.Identity()
    return LoraFactors(torch.randn(rank, 12, generator=gen, requires_grad=True),
                       torch.randn(10, rank, generator=gen, requires_grad=True), scaling, dropout)


@pytest.mark.parametrize("in_job_order", [True, False])
def test_packed_lora_delta_equals_the_per_token_delta_with_dropout(in_job_order):
    """Segment products over the job-sorted tokens against the per-row form with each token a row (its factors
    gathered per token): the same numbers and gradients, with two dropout rates, mixed ranks, a job without a LoRA
    here and base tokens, in and out of job order."""
    factors = [_factors(4, 2.0, 0.3, 0), None, _factors(2, 0.5, 0.0, 1), _factors(4, 1.5, 0.1, 2)]
    jobs = [0, 0, 1, 2, 2, 2, 3, 4, 4] if in_job_order else [3, 0, 2, 4, 0, 2, 1, 3, 2]
    token_jobs = torch.tensor(jobs)
    counts = torch.bincount(token_jobs, minlength=5)
    ends = counts.cumsum(0)
    order = None if in_job_order else torch.argsort(token_jobs, stable=True)
    segments = PackedSegments.of(jobs, 5, torch.device("cpu"))  # from the host's names, as the model makes them
    assert segments.ends.tolist() == ends.tolist()
    assert segments.order is None if order is None else [t.tolist() for t in segments.order] == [
        order.tolist(), torch.argsort(order).tolist()]
    x = torch.randn(1, len(jobs), 12, requires_grad=True)
    torch.manual_seed(0)
    got = packed_lora_delta(x, token_jobs, segments, factors)
    torch.manual_seed(0)
    want = indexed_lora_delta(x.view(len(jobs), 1, 12), token_jobs, factors).view(1, len(jobs), 10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[0, token_jobs == 4].abs().max() == 0 and got[0, token_jobs == 1].abs().max() == 0  # no LoRA there
    weights = torch.randn_like(got)
    params = [x] + [t for f in factors if f is not None for t in (f.lora_a, f.lora_b)]
    grads_got = torch.autograd.grad((got * weights).sum(), params)
    grads_want = torch.autograd.grad((want * weights).sum(), params)
    for g, w in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _packed_step(model, lengths: dict, seed: int):
    parts = {job: packed_part(n, seed=seed * 10 + i) for i, (job, n) in enumerate(lengths.items())}
    out = model(**packed_mixed_batch(parts).model_inputs(), use_cache=False)
    aux = out["aux_loss_per_adapter"]
    loss = out.logits.float().pow(2).mean() + sum(aux.values())
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return out.logits.detach(), {n: v.detach() for n, v in aux.items()}, dict(zip(named, grads, strict=True))


# the model's job order is lora, m1, m2, m3 (+ dyn); "out of order" mixes make the layers permute the tokens
MOE_MIXES = [{"lora": [5, 3], "m1": [6], "m2": [2, 7]}, {"m2": [4], "lora": [3], "m1": [2, 2], "m3": [5]},
             {"m3": [9], BASE_ROW: [4, 4]}, {"m1": [4, 2], "m3": [3], "lora": [6]},
             {"lora": [7], "m1": [3], "m2": [6], "m3": [3]}, {"m3": [2, 5], "m1": [8]}]


@pytest.mark.parametrize(("with_dynmole", "dynamic"), [(False, None), (False, True), (True, True)],
                         ids=["moe-per-token", "moe-per-token-dynamic", "dynmole-eager-blocks"])
def test_compiled_packed_steps_equal_eager_packed_steps(with_dynmole, dynamic):
    """LoRA and MixLoRA jobs of different ranks, expert counts and k, and base tokens, packed in one row: logits,
    each job's aux loss and every gradient as the eager packed step; once sizes are dynamic, no mix compiles again in
    either order (counted on the six MoE mixes; with `dynamic=True` each order compiles one graph, 4 without: those
    static graphs run as Dynamo traced them, AOTAutograd's numbers being the dynamic case's). With a DynMoLE job
    (every size dynamic, as the trainer compiles packed steps with eager blocks where no memory budget is set; the
    static packed path with eager blocks is not run here) the MLP blocks run eagerly inside the compiled step,
    nothing else breaks the graph, and the third mix, in job order as the first, compiles nothing."""
    torch._dynamo.reset()
    counters.clear()
    jobs = dict(JOBS, dyn=dynmole()) if with_dynmole else JOBS
    mixes = MOE_MIXES
    if with_dynmole:  # fewer mixes (each eager block adds frames to compile): in, out of and in job order
        mixes = [{"lora": [4], "dyn": [5, 2], BASE_ROW: [3]}, {"dyn": [3, 3], "m2": [4], "lora": [5]},
                 {"m1": [6], "m3": [2], "dyn": [7]}]
    base = one_layer_base if dynamic else tiny_base  # the static graphs on two layers, the token order's permutation
    eager = MultiJobModel(base(), jobs)  # made once a step and read by each layer
    randomize_adapters(eager, std=0.2)
    compiled = MultiJobModel(base(), jobs)
    compiled.load_state_dict(eager.state_dict())
    # static graphs as Dynamo traced them (their counts are Dynamo's; AOTAutograd's numbers: the dynamic case's)
    compiled.compile_mixed_steps(backend="aot_eager" if dynamic or with_dynmole else "eager", dynamic=dynamic)
    eager.train(), compiled.train()
    graphs = []
    for seed, lengths in enumerate(mixes):
        want, got = _packed_step(eager, lengths, seed), _packed_step(compiled, lengths, seed)
        _assert_same_step(got, want)
        assert set(want[1]) == {job for job in lengths if job not in ("lora", BASE_ROW)}
        graphs.append(counters["stats"]["unique_graphs"])
    # the tokens dynamic from the first graph: the second mix, out of job order, takes the branch that permutes the
    # tokens (guard `segments.order is None`), once
    if dynamic and not with_dynmole:
        assert graphs == [1, 2, 2, 2, 2, 2], graphs
    elif not dynamic:  # in order and out of order, each compiled static and then dynamic
        assert graphs == [1, 2, 3, 4, 4, 4], graphs
    else:  # the first mix compiles the eager blocks' frames, the second the order's branch, the third nothing
        assert graphs[2] == graphs[1] > graphs[0], graphs
    reasons = list(counters["graph_break"])
    assert all("run_eagerly" in reason for reason in reasons) and bool(reasons) == with_dynmole, reasons
    assert max(got[2][name].abs().max() for name in got[2] if ".m1." in name) > 1e-4  # the last step trains m1


def test_compiled_steps_take_one_name_per_row_or_per_token():
    model = MultiJobModel(tiny_base(), {"a": LoraConfig(r=4, target_modules=["q_proj"]), "m": mixlora()})
    model.compile_mixed_steps(backend="eager")  # (the names and the context: Dynamo's graphs suffice)
    with pytest.raises(ValueError, match=r"one adapter name per row, or per token of one packed row; got 5 names for "
                                         r"\(1, 6\) tokens"):
        model(input_ids=torch.randint(3, 500, (1, 6)), adapter_names=["a"] * 5)
    model(input_ids=torch.randint(3, 500, (1, 6)), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]),
          adapter_names=["m"] * 3 + ["a"] * 3)
    context = model._context()
    assert context.row_jobs.tolist() == [1, 1, 1, 0, 0, 0]
    assert context.segments.ends.tolist() == [3, 6, 6]  # a, m, base tokens
    assert [t.tolist() for t in context.segments.order] == [[3, 4, 5, 0, 1, 2], [3, 4, 5, 0, 1, 2]]
    model(input_ids=torch.randint(3, 500, (2, 3)), adapter_names=["m", "a"])  # rows again: no segments
    assert context.segments is None and context.row_jobs.tolist() == [1, 0]
    parts = {"m": packed_part([3]), "a": packed_part([3], seed=1)}
    assert mix(parts, job_order=model.peft_config).adapter_names == ["a"] * 3 + ["m"] * 3  # the trainer's order


def test_trainer_with_torch_compile_trains_padding_free_jobs_as_eagerly(assets, tmp_path):
    """`padding_free=True` with `torch_compile=True` (refused until 2026-12-05), under TRL's default activation
    checkpointing: a LoRA and a MixLoRA job in packed compiled steps end with the adapters the eager packed steps
    give them."""
    tokenizer, datasets = assets
    adapters = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        jobs = [JobConfig("a", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                          datasets["sentiment"], per_device_train_batch_size=3),
                JobConfig("m", mixlora(), datasets["capital"], per_device_train_batch_size=2, max_steps=4)]
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        args = run_args(tmp_path / str(compiled), padding_free=True, max_length=None, gradient_checkpointing=True,
                        **extra)
        trainer = MultiJobTrainer(model=one_layer_base(vocab_size=len(tokenizer)), jobs=jobs, args=args,
                                  processing_class=tokenizer)
        randomize_adapters(trainer.jobs_model)
        counters.clear()
        trainer.train()
        assert [r["status"] for r in trainer.job_summary] == ["done", "done"]
        assert (counters["stats"]["unique_graphs"] >= 1) == compiled
        if compiled:  # the checkpointed layers compiled inside the graph (none left eager), few graphs
            assert not counters["graph_break"], list(counters["graph_break"])
            assert counters["stats"]["unique_graphs"] <= 3, counters["stats"]["unique_graphs"]
        assert trainer.padding_stats.pad_fraction == 0.0
        adapters[compiled] = {job: load_file(os.path.join(args.output_dir, job, "adapter_model.safetensors"))
                              for job in ("a", "m")}
    # AdamW's normalised step (lr 1e-3) turns a rounding difference in a near-zero gradient into a few % of a step:
    # one expert entry of 2752 differed by 2e-5 after 4 steps
    for job, eager in adapters[False].items():
        for key, value in eager.items():
            torch.testing.assert_close(adapters[True][job][key], value, rtol=1e-4, atol=5e-5, msg=f"{job}: {key}")
