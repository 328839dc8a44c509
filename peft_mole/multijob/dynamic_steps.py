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
0.60-0.63× the time, and the steps after them run the same code as on Dynamo's own dynamic graph, but for the
OpenMP loop choices inductor makes from the sizes it compiles at (`bench/compiled_shapes.py`;
docs/performance-multijob.md, "Dynamic from the first graph").

Example (what `MultiJobModel.forward` does with `dynamic_steps(True)`):
    >>> inputs = {"input_ids": torch.randint(3, 500, (4, 9)), "attention_mask": torch.ones(4, 9)}
    >>> mark_step_inputs(inputs)
    >>> compiled_decoder(**inputs)  # its first graph serves any rows and length (but 1)
"""

from __future__ import annotations

import torch

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
