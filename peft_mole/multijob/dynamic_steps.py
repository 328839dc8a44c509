"""Compiled multi-job steps with the rows and the length dynamic from the first graph.

Dynamo compiles a frame's first graph with static sizes and, at the first change of a size, a second graph with that
size dynamic. Mixed steps built by length grouping change their rows and length from the second step on, so that
first graph serves one step. With `MultiJobModel.dynamic_steps(True)` (`compile_mixed_steps(dynamic=True)`; in
MultiJobTrainer where its jobs' first micro-batches differ in width, `batching.widths_differ`, or with `accelerate
launch --dynamo_use_dynamic true`) every tensor of a step that holds those sizes is marked dynamic from the first
step on (`torch._dynamo.maybe_mark_dynamic`, whose marks a size of 1 does not take): the model's inputs, the per-row
(per-token, packed) job indices and the real tokens' mask, which MixLoRA blocks record with (left static, it
specialised the rows: a second graph). The parameters keep static shapes; torch.compile's own `dynamic=True` makes
every input size symbolic, slower to compile and to step. On `small` the first six steps of varying shape compile in
0.60-0.63× the time; the steps after them took 1.05× (LoRA jobs) and 1.08× (MixLoRA jobs) by medians, within the
spread from one process to the next (MixLoRA jobs: inductor's code is that of Dynamo's own dynamic graph up to the
OpenMP loop choices it makes from the sizes it compiles at; `bench/compiled_shapes.py`;
docs/performance-multijob.md, "Dynamic from the first graph"). Where blocks run eagerly inside the step (DynMoLE
jobs, DoRA experts) the frames after them take the graph's intermediates, which cannot be marked: those steps run
with every size dynamic (`step_config`).

Example (what `MultiJobModel.forward` does with `dynamic_steps(True)`):
    >>> inputs = {"input_ids": torch.randint(3, 500, (4, 9)), "attention_mask": torch.ones(4, 9)}
    >>> mark_step_inputs(inputs)
    >>> compiled_decoder(**inputs)  # its first graph serves any rows and length (but 1)
"""

from __future__ import annotations

import torch
from torch import nn

from peft_mole.tuners.mixlora.projection import MoELoraLinear
from peft_mole.tuners.mixlora.routed import RoutedExpertsLayer

STEP_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "labels", "seq_idx", "cu_seq_lens_q",
               "cu_seq_lens_k")  # the model's keyword inputs whose first sizes are a step's rows and length


def mark_rows_and_length(*tensors: torch.Tensor | None) -> None:
    """Mark the first two sizes of each tensor (rows and length; the tokens of a packed row) dynamic. None and
    other values are skipped. A marked tensor keeps its marks: never mark a cached constant, which later models
    would see marked."""
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            for dim in range(min(tensor.dim(), 2)):
                torch._dynamo.maybe_mark_dynamic(tensor, dim)


def mark_step_inputs(kwargs: dict) -> None:
    """`mark_rows_and_length` on a forward's keyword inputs (`STEP_INPUTS`)."""
    mark_rows_and_length(*(kwargs.get(name) for name in STEP_INPUTS))


def runs_blocks_eagerly(model: nn.Module) -> bool:
    """Whether a compiled step of `model` runs expert blocks eagerly (`routed.run_eagerly`): DynMoLE jobs (a
    data-dependent number of experts per token), DoRA experts, or experts routed per projection. Each such block
    breaks the graph, and Dynamo resumes the decoder layer after it in a frame of its own, whose inputs (hidden states,
    residual) come out of the graph before it: they cannot be marked, so for those steps every size Dynamo meets is
    taken dynamic from the first graph (`step_config`), the parameters' and modules' attributes excepted (Dynamo's
    `force_parameter_static_shapes`, `force_nn_module_property_static_shapes`)."""
    return any(isinstance(layer, MoELoraLinear)
               or any(settings.selection_varies for settings in layer.settings.values())
               or any(experts.use_dora for experts in layer.experts.values())
               for layer in model.modules() if isinstance(layer, RoutedExpertsLayer))


def step_config(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Mark a compiled step's inputs (`mark_step_inputs`, and `input_ids` given by position) and return the Dynamo
    settings its forward runs under: `assume_static_by_default=False` where the model runs blocks eagerly
    (`runs_blocks_eagerly`, read once per set of jobs). On `tiny`, a LoRA, a MixLoRA, a DynMoLE and a MixDoRA job
    over five steps of three shapes: 6 graphs, where the marks alone (and Dynamo's rule) compiled 12."""
    mark_step_inputs(kwargs)
    mark_rows_and_length(*args[:1])
    jobs = tuple(getattr(model, "peft_config", ()))
    if model.__dict__.get("_eager_blocks_of") != jobs:
        model.__dict__["_eager_blocks_of"], model.__dict__["_eager_blocks"] = jobs, runs_blocks_eagerly(model)
    return {"assume_static_by_default": False} if model.__dict__["_eager_blocks"] else {}
