"""BENCH.md ratio 6, `memory_model_error`: |predicted − measured| / measured step memory over a sweep of batch
shapes, for the scheduler's memory model Mem ≈ β0 + β1·ΣL + β2·ΣL² fitted on 5 profiling shapes (as
MultiJobTrainer does when max_memory is set).

Measured: peak CUDA memory on a GPU; on CPU (no allocator statistics) the bytes autograd saves for backward in
the forward (peft_mole.multijob.memory.activation_bytes), the part of step memory that depends on the batch.
Usage: python bench/memory_model_error.py [--shape small] [--jobs 4]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import base_model, device, emit, setup_threads
from multijob_speedup import lora_config

from peft_mole.multijob import MultiJobModel
from peft_mole.multijob.memory import MemoryModel, step_memory

PROFILE = [(1, 64), (2, 128), (1, 256), (2, 256), (4, 128)]
SWEEP = [(1, 32), (1, 128), (2, 64), (2, 200), (3, 96), (3, 256), (4, 48), (4, 160), (6, 100), (8, 64), (8, 128),
         (5, 230)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--jobs", type=int, default=4)
    args = parser.parse_args()
    setup_threads()
    names = [f"job{i}" for i in range(args.jobs)]
    model = MultiJobModel(base_model(args.shape), {name: lora_config() for name in names})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.model.config.vocab_size

    def measure(rows: int, length: int) -> float:
        ids = torch.randint(3, vocab, (rows, length), device=device())
        adapters = [names[i % len(names)] for i in range(rows)]

        def step() -> None:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, adapter_names=adapters)
            torch.autograd.grad(out.loss, params, allow_unused=True)

        return step_memory(device(), step)

    memory = MemoryModel()
    for rows, length in PROFILE:
        memory.observe([length] * rows, measure(rows, length))
    memory.fit()
    errors = []
    for rows, length in SWEEP:
        measured = measure(rows, length)
        predicted = memory.predict([length] * rows)
        errors.append(abs(predicted - measured) / measured)
        emit({"name": "memory_model_point", "shape": args.shape, "rows": rows, "length": length,
              "measured_mb": measured / 2**20, "predicted_mb": predicted / 2**20, "error": errors[-1]})
    emit({
        "name": "memory_model_error", "shape": args.shape, "jobs": args.jobs, "shapes": len(SWEEP),
        "device": str(device()), "measure": "cuda_peak" if device().type == "cuda" else "saved_activation_bytes",
        "ratio_median": statistics.median(errors), "ratio_min": min(errors), "error_max": max(errors),
        "error_mean": statistics.mean(errors), "beta": [float(b) for b in memory.beta],
    })


if __name__ == "__main__":
    main()
