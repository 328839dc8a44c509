"""Edge cases of the compiled multi-job step's per-row blocks (a review, 2026-12-08): tied router probabilities,
blocks a job adds after compiling, and a step without rows of any MoE job."""

from __future__ import annotations

import torch
from peft import LoraConfig

from peft_mole import routing
from peft_mole.forward_context import BASE_ROW
from peft_mole.multijob import MultiJobModel
from tests.helpers import mixlora, randomize_adapters, tiny_base
from tests.multijob.test_compiled_moe_steps import _assert_same_step, _step
from tests.multijob.test_trainer import ALL_LINEAR

JOBS = {"m1": mixlora(num_experts=4, top_k=2), "m2": mixlora(num_experts=6, top_k=3, r=2)}


def _eager_and_per_row(jobs):
    eager = MultiJobModel(tiny_base(), jobs)
    randomize_adapters(eager)
    per_row = MultiJobModel(tiny_base(), jobs)
    per_row.load_state_dict(eager.state_dict())
    per_row.__dict__["_compiled_steps"] = True  # the per-row layers, run eagerly (no compiler)
    return eager.train(), per_row.train()


def test_tied_router_probabilities_choose_the_same_experts_per_row_as_alone():
    """Zero routers (`router_init_std=0` is allowed): every token's probabilities tie. `torch.topk` broke the tie by
    the row's width, so per row (every job's experts side by side) other experts were chosen than eagerly: logits
    0.13 off. Both now take the lowest experts of a tie (a stable sort)."""
    eager, per_row = _eager_and_per_row(JOBS)
    with torch.no_grad():
        for model in (eager, per_row):
            for name, p in model.named_parameters():
                if "router" in name:
                    p.zero_()
    names = ["m1", "m2", "m1"]
    _assert_same_step(_step(per_row, names, 7, 0), _step(eager, names, 7, 0))
    weights, experts = routing.top_k_routing(torch.full((2, 4), 0.25), k=2)
    assert experts.tolist() == [[0, 1], [0, 1]] and weights.tolist() == [[0.5, 0.5]] * 2


def test_a_job_added_after_compiling_marks_its_blocks_as_their_layers_are_checkpointed():
    """The flag was set at `compile_mixed_steps` only: a block a later job added kept False in a checkpointed layer
    (its pairs then recomputed twice)."""
    model = MultiJobModel(tiny_base(), {"m0": mixlora(layers_to_transform=[0])})
    model.model.gradient_checkpointing_enable({"use_reentrant": False})
    model.compile_mixed_steps(backend="eager")  # (compiles at the first forward: none here)
    model.add_job("m1", mixlora())
    flags = [m.layer_checkpointed for m in model.modules() if hasattr(m, "layer_checkpointed")]
    assert flags == [True, True]


def test_a_step_without_moe_rows_returns_what_the_eager_step_returns():
    """Per row every MixLoRA job records (masked) statistics; with no rows of one, eager returns no aux loss, the
    per-row step returned `aux_loss=0` (an int) and an empty dict."""
    jobs = {"lora": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR), **JOBS}
    eager, per_row = _eager_and_per_row(jobs)
    ids = torch.randint(3, 500, (2, 5), generator=torch.Generator().manual_seed(0))
    outputs = [model(input_ids=ids, adapter_names=["lora", BASE_ROW]) for model in (eager, per_row)]
    assert sorted(outputs[1].keys()) == sorted(outputs[0].keys()) and "aux_loss" not in outputs[0]
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits)
