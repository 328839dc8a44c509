"""Issue 6, part 6: the step ratios of BENCH.md on a GPU, `medium` shape (TinyLlama-1.1B: hidden 2048, 22 layers,
batch 8 × 512), bf16 base weights, plus each model's peak CUDA memory for one step.

Rows: `mixlora_vs_lora`, `dynmole_vs_mixlora` (routers at init, and sharp as after training), each with the
models' step times; `peak_cuda_memory` per model (max allocated during a step, minus what was allocated before it:
the step's activations, gradients and temporaries, above the weights and the AdamW state a first step made; before
2026-12-06 this said the AdamW state was in it). Without CUDA it prints one row saying so and exits 0.
With --autocast bf16 the steps run under bf16 autocast, as `TrainingArguments(bf16=True)` trains (the adapters stay
fp32, their products run in bf16: on CUDA the expert chains then use `torch._grouped_mm`); without it the bf16 base's
outputs meet fp32 adapters, as in PEFT without autocast. Rows carry `autocast`.
Usage: python bench/gpu_medium.py [--shape medium] [--repeats 10] [--autocast bf16]
"""

from __future__ import annotations

import torch
from common import (
    base_model,
    dynmole_config,
    emit,
    lora_config,
    mixlora_config,
    random_batch,
    record,
    step_parser,
    time_interleaved,
)
from common import train_step_fn as make_step
from peft import get_peft_model


def peak_step_mb(step) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def main() -> None:
    parser = step_parser()
    parser.set_defaults(shape="medium")
    parser.add_argument("--router-scale", type=float, default=4.0)
    parser.add_argument("--autocast", choices=["off", "bf16"], default="off")
    args = parser.parse_args()
    autocast = torch.bfloat16 if args.autocast == "bf16" else None
    if not torch.cuda.is_available():
        emit({"name": "gpu_medium", "skipped": "no CUDA device"})  # the CPU figures: `make bench`
        return
    configs = {
        "peft_lora": lora_config(),
        "mixlora": mixlora_config(),
        "dynmole": dynmole_config(),
    }
    models = {name: get_peft_model(base_model(args.shape), cfg) for name, cfg in configs.items()}
    batch = random_batch(args.shape, models["mixlora"].config.vocab_size)
    tokens = batch["input_ids"].numel()
    steps = {name: make_step(model, batch, autocast) for name, model in models.items()}
    for state in ("init", "sharp"):
        if state == "sharp":
            with torch.no_grad():
                for name, p in models["dynmole"].named_parameters():
                    if "router" in name:
                        p.mul_(args.router_scale)
        for name, step in steps.items():
            step()  # optimizer state allocated before measuring
            emit({"name": "peak_cuda_memory", "script": "gpu_medium", "shape": args.shape, "impl": name,
                  "router_state": state, "autocast": args.autocast,
                  "peak_step_mb": round(peak_step_mb(step), 1)})
        times = time_interleaved(steps, repeats=args.repeats)
        rows = {name: record("train_step", args.shape, name, secs, tokens, router_state=state, autocast=args.autocast)
                for name, secs in times.items()}
        pairs = [("dynmole_vs_mixlora", "dynmole", "mixlora")]
        if state == "init":
            pairs.append(("mixlora_vs_lora", "mixlora", "peft_lora"))
        for ratio, top, bottom in pairs:
            emit({"name": ratio, "script": "gpu_medium", "shape": args.shape, "router_state": state, "dropout": 0.05,
                  "autocast": args.autocast,
                  "ratio_median": rows[top]["median_s"] / rows[bottom]["median_s"],
                  "ratio_min": rows[top]["min_s"] / rows[bottom]["min_s"]})


if __name__ == "__main__":
    main()
