"""Compiled multi-job steps with DynMoLE jobs and DoRA experts: their blocks run eagerly inside the compiled step
(rows grouped by job, as in an eager step), the rest of each layer stays compiled, and no mix of jobs compiles
again."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig
from torch._dynamo.utils import counters

from peft_mole import JobConfig
from peft_mole.forward_context import BASE_ROW
from peft_mole.multijob import MultiJobModel
from peft_mole.multijob.dynamic_steps import runs_blocks_eagerly, step_config
from tests.helpers import dynmole, mixlora, one_layer_base, randomize_adapters, tiny_base
from tests.multijob.test_compiled_moe_steps import (
    _assert_same_step,
    _step,
    assert_compiled_training_equals_eager,
)
from tests.multijob.test_trainer import ALL_LINEAR

LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR)
BLOCK_JOBS = {"lora": LORA, "mix": mixlora(top_k=2), "dyn": dynmole(),
              "dora": mixlora(num_experts=3, top_k=1, use_dora=True)}
BLOCK_MIXES = [(["dyn", "lora", "mix", "dora"], 10), (["dora", "mix", BASE_ROW, "dyn"], 10), (["lora", "mix"], 14),
               (["dyn", "dora", "lora", "mix"], 8), (["mix", "dyn"], 11)]
# router_scope="projection": gate, up and down each routed (one scope per model)
PROJECTION_JOBS = {"lora": LORA, "dyn": dynmole(router_scope="projection"),
                   "dyn2": dynmole(num_experts=3, router_scope="projection", expert_target_modules=["up_proj"])}
PROJECTION_MIXES = [(["dyn", "lora", "dyn2"], 10), (["dyn2", BASE_ROW, "dyn"], 10), (["lora", "dyn"], 14),
                    (["dyn2", "dyn", "lora"], 8), (["dyn", "lora"], 11)]


# "block": Dynamo's rule (the trainer's with a memory budget, or where the widths do not vary), its graphs run as
# traced: what it checks, the recompiles and the recompile limit, is Dynamo's. The others: every size dynamic (the
# trainer's where the widths vary), through AOTAutograd, for the numbers. (Projection-routed experts under the rule,
# 3 eager blocks a layer, ran until 2026-12-07: 35 s a run, left out for the suite's time.) Two decoder layers for
# the rule (each layer's eager-block frames under the recompile limit) and for the projection-routed experts (their
# only compiled case here).
@pytest.mark.parametrize(("jobs", "mixes", "dynamic", "backend", "base"), [
    (BLOCK_JOBS, BLOCK_MIXES, None, "eager", tiny_base),
    (BLOCK_JOBS, BLOCK_MIXES, True, "aot_eager", one_layer_base),
    (PROJECTION_JOBS, PROJECTION_MIXES, True, "aot_eager", tiny_base),
], ids=["block", "block-dynamic", "projection-dynamic"])
def test_dynmole_and_dora_blocks_run_eagerly_in_the_compiled_step_with_the_eager_numbers(jobs, mixes, dynamic,
                                                                                         backend, base):
    torch._dynamo.reset()
    counters.clear()
    eager = MultiJobModel(base(), jobs)
    randomize_adapters(eager, std=0.2)  # routers neither flat nor one-hot: DynMoLE picks 1 to 4 experts
    compiled = MultiJobModel(base(), jobs)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_mixed_steps(backend=backend, dynamic=dynamic)
    eager.train(), compiled.train()
    graphs, warnings = [], []
    handler = logging.Handler()
    handler.emit = warnings.append
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    dynamo_log.addHandler(handler)
    try:
        for seed, (names, seq) in enumerate(mixes):
            want, got = _step(eager, names, seq, seed), _step(compiled, names, seq, seed)
            _assert_same_step(got, want)
            assert set(want[1]) == {n for n in names if n not in ("lora", BASE_ROW)}  # each present job's aux loss
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        dynamo_log.removeHandler(handler)
    # each eager block resumes its decoder layer's code in a frame of its own: none may fall back to eager for
    # want of compiles (Dynamo's limit of 8; `compile_mixed_steps` raises it per decoder layer)
    assert not [w for w in warnings if "recompile_limit" in w.getMessage()]
    assert graphs[2:] == [graphs[2]] * 3, graphs  # once rows and length are dynamic, no mix compiles again
    if dynamic:  # every frame's sizes dynamic from its first graph (`dynamic_steps.step_config`): the frames
        assert graphs == [graphs[0]] * 5, graphs  # after the eager blocks compile once (two layers: 6, 6, 12, 12,
        # 12 before)
    reasons = list(counters["graph_break"])
    assert reasons and all("run_eagerly" in reason for reason in reasons), reasons  # the eager blocks, nothing else
    routers = [name for name in got[2] if "router" in name and ".dyn." in name]
    assert routers and max(got[2][name].abs().max() for name in routers) > 1e-5  # DynMoLE's routers learn


def test_steps_with_eager_blocks_take_every_size_dynamic_under_dynamic_steps():
    """`dynamic_steps.step_config`: DynMoLE jobs, DoRA experts and projection-routed experts run blocks eagerly, so
    the step runs with `assume_static_by_default=False`; LoRA and MixLoRA jobs alone keep the marks only, and a job
    added later is seen."""
    inputs = {"input_ids": torch.randint(3, 500, (3, 7))}
    cases = [({"lora": LORA, "mix": mixlora()}, False), ({"mix": mixlora(), "dyn": dynmole()}, True),
             ({"dora": mixlora(use_dora=True)}, True), ({"proj": dynmole(router_scope="projection")}, True)]
    models = [MultiJobModel(tiny_base(), jobs) for jobs, _ in cases]
    for model, (jobs, eager_blocks) in zip(models, cases, strict=True):
        assert runs_blocks_eagerly(model) is eager_blocks, jobs
        assert step_config(model, (), dict(inputs)) == ({"assume_static_by_default": False} if eager_blocks else {})
    models[0].add_job("dyn", dynmole())  # read again for the new set of jobs
    assert step_config(models[0], (), dict(inputs)) == {"assume_static_by_default": False}


def test_trainer_with_torch_compile_trains_dynmole_jobs_as_eagerly(assets, tmp_path):
    tokenizer, datasets = assets
    jobs = [
        JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
                  datasets["sentiment"], per_device_train_batch_size=3),
        JobConfig("dyn", dynmole(), datasets["capital"], per_device_train_batch_size=2, gradient_accumulation_steps=2),
    ]
    assert_compiled_training_equals_eager(jobs, tokenizer, tmp_path)
