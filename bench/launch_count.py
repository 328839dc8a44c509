"""Operator launches per train step (forward + backward + AdamW), counted on the CPU, as a stand-in for the kernel
launches of the same step on a GPU, where a step of small kernels is bound by launching them (docs/gpu.md).
Counted: the lowest `aten::` operators that compute (views, reshapes, allocations and conversions to the dtype a
tensor already has launch nothing).

The blockwise expert chains (`ops.gated`, `ops.pair_mixture`, `ops.dense_mixture`) use cache-sized blocks on the
CPU and larger ones on a GPU (`gated.block_elements`); `--blocks gpu` counts with the GPU's block sizes. The shape's
widths and batch are kept (block counts depend on them), the depth and `--vocab` are cut so that a CPU step takes
seconds: models of 1 and 2 layers are counted, and their difference is the count per decoder layer.
Usage: python bench/launch_count.py [--shape medium] [--blocks cpu gpu]
"""

from __future__ import annotations

import argparse

import torch
from common import BATCH, emit, lora_config, mixlora_config, positive_int, setup_threads, train_step_fn
from multijob_speedup import mixed_step_fn
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile

import peft_mole
from peft_mole import synthetic
from peft_mole.multijob import MultiJobModel
from peft_mole.ops import dense_mixture, gated

NO_KERNEL = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::t", "aten::transpose", "aten::as_strided",
    "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::permute",
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::detach", "aten::alias", "aten::_unsafe_view",
    "aten::split", "aten::split_with_sizes", "aten::narrow", "aten::unbind", "aten::resolve_conj",
    "aten::resolve_neg", "aten::lift_fresh", "aten::result_type", "aten::is_nonzero", "aten::_local_scalar_dense",
    "aten::item", "aten::lift_fresh_copy", "aten::numpy_T", "aten::unflatten", "aten::flatten", "aten::chunk",
    "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::resize_", "aten::set_", "aten::zeros",
    "aten::scalar_tensor",
}

ONE_KERNEL = {"aten::_grouped_mm"}  # one kernel on CUDA; on the CPU a loop of products over its groups


def computing_ops(event) -> int:
    """The lowest `aten::` operators under `event` that compute: an operator whose callees compute (a copy under
    `to`, a product under `linear`) counts through them; one whose callees only view or allocate counts itself."""
    if event.name in ONE_KERNEL:
        return 1
    below = sum(computing_ops(child) for child in event.cpu_children)
    if below or not event.name.startswith("aten::") or event.name in NO_KERNEL:
        return below
    return 1


def launches_per_step(step) -> int:
    """Operators of one forward + backward; the optimizer's are left out (on CUDA AdamW runs as a few fused
    `foreach` kernels, on the CPU as a loop over parameters, so its CPU count says nothing of a GPU)."""
    step()  # optimizer state made: the counted step is a steady one
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(computing_ops(e) for e in prof.events()
               if e.cpu_parent is None and not e.name.startswith("Optimizer."))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="medium", choices=list(BATCH))
    parser.add_argument("--vocab", type=positive_int, default=1024)
    parser.add_argument("--blocks", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"])
    args = parser.parse_args()
    setup_threads()
    rows, seq = BATCH[args.shape]
    ids = torch.randint(3, args.vocab, (rows, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    jobs = [f"job{i}" for i in range(4)]
    per_job = max(1, rows // len(jobs))
    jobs_batch = {key: value[:1].expand(per_job * len(jobs), -1).contiguous() if rows < len(jobs) else value
                  for key, value in batch.items()}
    builds = {
        "peft_lora": lambda base: train_step_fn(get_peft_model(base, lora_config()), batch),
        "mixlora": lambda base: train_step_fn(get_peft_model(base, mixlora_config()), batch),
        "dynmole_init": lambda base: train_step_fn(get_peft_model(base, peft_mole.DynMoLEConfig(
            num_experts=8, r=16, lora_alpha=32, lora_dropout=0.05)), batch),
        # 4 LoRA jobs in one mixed-adapter step, the shape's rows shared among them (at least one each)
        "multijob_4_lora": lambda base: mixed_step_fn(MultiJobModel(base, {job: lora_config() for job in jobs}),
                                                      jobs_batch, jobs, per_job),
    }
    cpu_sizes = (gated.CHUNK_ELEMENTS, dense_mixture.BLOCK_ELEMENTS)
    gpu = torch.device("cuda")  # only its type is read: no CUDA needed
    for blocks in args.blocks:
        if blocks == "gpu":
            gated.CHUNK_ELEMENTS = gated.block_elements(gpu, cpu_sizes[0])
            dense_mixture.BLOCK_ELEMENTS = gated.block_elements(gpu, cpu_sizes[1])
        for name, build in builds.items():
            if blocks == "gpu" and name in ("peft_lora", "multijob_4_lora"):
                continue  # no blockwise chain in LoRA
            counts = [launches_per_step(build(synthetic.random_model(
                "llama", args.shape, num_hidden_layers=layers, vocab_size=args.vocab))) for layers in (1, 2)]
            emit({"name": "launch_count", "shape": args.shape, "impl": name, "blocks": blocks,
                  "launches_one_layer_model": counts[0], "launches_per_layer": counts[1] - counts[0]})
        gated.CHUNK_ELEMENTS, dense_mixture.BLOCK_ELEMENTS = cpu_sizes


if __name__ == "__main__":
    main()
