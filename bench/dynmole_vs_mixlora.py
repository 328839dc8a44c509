"""BENCH.md ratio 2, `dynmole_vs_mixlora`: DynMoLE train-step time / MixLoRA (top-2) train-step time.

DynMoLE's cost follows how many experts its rule selects. At init the routers are near uniform, so every token
is broadcast to all E experts; trained routers are confident (the demo ends near 2.2 experts per token). The
script measures both states: `init`, and `sharp` (router weights scaled by --router-scale so that the mean
experts per token is close to a trained router's). Each row reports the measured experts per token.
Usage: python bench/dynmole_vs_mixlora.py [--shape small] [--router-scale 4]
"""

from __future__ import annotations

import torch
from common import (
    base_model,
    emit,
    random_batch,
    record,
    setup_threads,
    step_parser,
    time_interleaved,
    train_step_fn,
)
from peft import get_peft_model

import peft_mole
from peft_mole.diagnostics import layer_stats


def experts_per_token(model, batch) -> float:
    stats = layer_stats(model, batch["input_ids"], batch["attention_mask"])
    return sum(s.experts_per_token for s in stats.values()) / len(stats)


def main() -> None:
    parser = step_parser()
    parser.add_argument("--router-scale", type=float, default=4.0)
    args = parser.parse_args()
    setup_threads()
    common = dict(num_experts=8, r=16, lora_alpha=32, lora_dropout=0.05)
    mixlora = get_peft_model(base_model(args.shape), peft_mole.MixLoRAConfig(top_k=2, **common))
    dynmole = get_peft_model(base_model(args.shape), peft_mole.DynMoLEConfig(**common))
    batch = random_batch(args.shape, mixlora.config.vocab_size)
    tokens = batch["input_ids"].numel()
    for state in ("init", "sharp"):
        if state == "sharp":
            with torch.no_grad():
                for name, p in dynmole.named_parameters():
                    if "router" in name:
                        p.mul_(args.router_scale)
        per_token = experts_per_token(dynmole, batch)
        times = time_interleaved(
            {"mixlora": train_step_fn(mixlora, batch), "dynmole": train_step_fn(dynmole, batch)}, repeats=args.repeats
        )
        rows = {
            impl: record("train_step", args.shape, impl, times[impl], tokens, router_state=state)
            for impl in ("mixlora", "dynmole")
        }
        emit({
            "name": "dynmole_vs_mixlora", "shape": args.shape, "router_state": state,
            "dynmole_experts_per_token": per_token,
            "ratio_median": rows["dynmole"]["median_s"] / rows["mixlora"]["median_s"],
            "ratio_min": rows["dynmole"]["min_s"] / rows["mixlora"]["min_s"],
        })


if __name__ == "__main__":
    main()
