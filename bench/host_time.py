"""Host time of one adapted projection in a multi-job step, against PEFT's LoRA on one job's rows.

On the `tiny` shape a projection's products take microseconds, so its forward + backward time is the host's work:
Python, operator dispatch, autograd nodes. That is what bounds a multi-job step on a GPU, where one-row jobs make
small kernels (docs/performance-multijob.md, "Host time of a multi-job step"). Printed per N: peft-mole's LoRA-job layer
on N jobs of one row each (their products stacked) and PEFT's `lora.Linear` on one job's row, each the q projection
of layer 0, forward + backward, interleaved; `ratio_median` is the first over the second, and N times PEFT's time is
what training the jobs one after another spends there.
Usage: python bench/host_time.py [--jobs 4 8] [--dropout 0] [--repeats 2000]
"""

from __future__ import annotations

import argparse

import torch
from common import (
    BATCH,
    base_model,
    device,
    emit,
    lora_config,
    positive_int,
    probability,
    record,
    setup_threads,
    time_interleaved,
)
from peft import get_peft_model

from peft_mole.multijob import MultiJobModel


def first_projection(model, name: str = "layers.0.self_attn.q_proj"):
    return next(module for path, module in model.named_modules() if path.endswith(name))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=positive_int, nargs="+", default=[4, 8])
    parser.add_argument("--dropout", type=probability, default=0.0,
                        help="LoRA dropout; 0 by default, as on a GPU a dropout is one kernel either way, while on "
                             "the CPU peft-mole's cheaper masks take more operators than `nn.Dropout`'s")
    parser.add_argument("--repeats", type=positive_int, default=2000)
    args = parser.parse_args()
    setup_threads()
    seq = BATCH["tiny"][1]
    lora = get_peft_model(base_model("tiny"), lora_config(args.dropout)).train()
    peft_projection = first_projection(lora)
    width = peft_projection.in_features
    # where and as the base holds its weights (bf16 on CUDA; before 2026-12-06 CPU fp32 inputs failed there)
    placed = {"device": device(), "dtype": peft_projection.base_layer.weight.dtype}
    one_row = torch.randn(1, seq, width, requires_grad=True, **placed)
    for n in args.jobs:
        jobs = [f"job{i}" for i in range(n)]
        mixed = MultiJobModel(base_model("tiny"), {job: lora_config(args.dropout) for job in jobs}).train()
        projection = first_projection(mixed)
        projection._context.set_row_adapters(jobs)  # what MultiJobModel.forward sets for a batch of these rows
        rows = torch.randn(n, seq, width, requires_grad=True, **placed)
        times = time_interleaved({
            "multijob_projection": lambda p=projection, x=rows: p(x).sum().backward(),
            "peft_lora_projection": lambda: peft_projection(one_row).sum().backward(),
        }, warmup=50, repeats=args.repeats)
        found = {impl: record("host_time_projection", "tiny", impl, t, (n if impl.startswith("multijob") else 1) * seq,
                              jobs=n, dropout=args.dropout) for impl, t in times.items()}
        emit({"name": "host_time", "shape": "tiny", "jobs": n, "dropout": args.dropout,
              "ratio_median": found["multijob_projection"]["median_s"] / found["peft_lora_projection"]["median_s"],
              "ratio_min": found["multijob_projection"]["min_s"] / found["peft_lora_projection"]["min_s"]})


if __name__ == "__main__":
    main()
