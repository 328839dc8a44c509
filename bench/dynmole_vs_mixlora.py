"""BENCH.md ratio 2, `dynmole_vs_mixlora`: DynMoLE train-step time / MixLoRA (top-2) train-step time.

DynMoLE's cost follows how many experts its rule selects. At init the routers are near uniform, so every token
is broadcast to all E experts; trained routers are confident (the demo ends near 2.2 experts per token). The
script measures both states: `init`, and `sharp` (router weights scaled by --router-scale so that the mean
experts per token is close to a trained router's). Each row reports the measured experts per token.

At init it also times DynMoLE with the compiled block kernels of `ops.fused_chain` (an option, off by default) in
the same interleaved rounds: the `dynmole_fused_chain` row gives that step over the default DynMoLE step and over
MixLoRA, and the first fused step's extra time, compiled with empty inductor and Triton caches (`compile_s`); an
`error` row instead if the kernels never ran. The fused chain serves the dense path only, which needs at least
`DENSE_FRACTION` of the experts selected: wider models start with sharper routers (the medium shape at init: 4.5 of
8), so `--init-router-scale S` scales the initialised routers for the first state, which is then named `flat` for
S = 0 (every token to every expert) and `init×S` for another S than 1. The sharp state scales by --router-scale the
routers as the first state's steps left them, with the initialised part unscaled again (for S = 1, as before).
Usage: python bench/dynmole_vs_mixlora.py [--shape small] [--router-scale 4] [--init-router-scale 1]
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
from common import (
    base_model,
    emit,
    random_batch,
    record,
    setup_threads,
    step_parser,
    synchronize,
    time_interleaved,
    train_step_fn,
)
from peft import get_peft_model

import peft_mole
from peft_mole.diagnostics import layer_stats
from peft_mole.ops.experts import DENSE_FRACTION
from peft_mole.ops.fused_chain import fused_blocks_run, set_fused_chain


def experts_per_token(model, batch) -> float:
    stats = layer_stats(model, batch["input_ids"], batch["attention_mask"])
    return sum(s.experts_per_token for s in stats.values()) / len(stats)


def switched(step, fused: bool):
    """`step` with the fused chain switched on or off first (the switch is process-wide)."""

    def run():
        set_fused_chain(fused)
        step()

    return run


def first_fused_step_s(step) -> float:
    """Seconds of the first fused step, compiling its kernels with empty inductor and Triton caches."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")
    start = time.perf_counter()
    switched(step, True)()
    synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = step_parser()
    parser.add_argument("--router-scale", type=float, default=4.0)
    parser.add_argument("--init-router-scale", type=float, default=1.0,
                        help="scale of the routers in the first state (0: flat routers; default 1: as initialised)")
    args = parser.parse_args()
    if args.init_router_scale < 0:
        parser.error(f"--init-router-scale must be >= 0, got {args.init_router_scale}")
    first = ("init" if args.init_router_scale == 1 else "flat" if args.init_router_scale == 0
             else f"init×{args.init_router_scale:g}")
    setup_threads()
    common = dict(num_experts=8, r=16, lora_alpha=32, lora_dropout=0.05)
    mixlora = get_peft_model(base_model(args.shape), peft_mole.MixLoRAConfig(top_k=2, **common))
    dynmole = get_peft_model(base_model(args.shape), peft_mole.DynMoLEConfig(**common))
    batch = random_batch(args.shape, mixlora.config.vocab_size)
    tokens = batch["input_ids"].numel()
    routers = {name: p.detach().clone() for name, p in dynmole.named_parameters() if "router" in name}
    for state in (first, "sharp"):
        scale = args.router_scale if state == "sharp" else args.init_router_scale
        with torch.no_grad():
            for name, p in dynmole.named_parameters():
                if name in routers and state == first:  # the initialised routers, scaled
                    p.copy_(routers[name] * scale)
                elif name in routers:  # the routers as the timed steps left them, the initialised part unscaled
                    p.add_(routers[name] * (1.0 - args.init_router_scale)).mul_(scale)
        per_token = experts_per_token(dynmole, batch)
        dynmole_step = train_step_fn(dynmole, batch)
        steps = {"mixlora": train_step_fn(mixlora, batch), "dynmole": switched(dynmole_step, False)}
        if state == first:  # sharp routers dispatch their tokens: the fused chain would not run
            first_s = first_fused_step_s(dynmole_step)
            blocks_before = fused_blocks_run()
            steps["dynmole_fused_chain"] = switched(dynmole_step, True)
        times = time_interleaved(steps, repeats=args.repeats)
        set_fused_chain(None)
        rows = {
            impl: record("train_step", args.shape, impl, times[impl], tokens, router_state=state)
            for impl in times
        }
        emit({
            "name": "dynmole_vs_mixlora", "shape": args.shape, "router_state": state,
            "router_scale": scale, "dynmole_experts_per_token": per_token,
            "ratio_median": rows["dynmole"]["median_s"] / rows["mixlora"]["median_s"],
            "ratio_min": rows["dynmole"]["min_s"] / rows["mixlora"]["min_s"],
        })
        if state != first:
            continue
        fused = rows["dynmole_fused_chain"]
        if fused_blocks_run() == blocks_before:  # a compile failure (logged), or no dense layer with a full block
            emit({"name": "dynmole_fused_chain", "shape": args.shape, "router_state": state,
                  "error": f"the compiled kernels never ran: the fused rows timed the eager chain ({per_token:.2f} "
                           f"experts/token; the dense chain runs where at least {DENSE_FRACTION:.0%} of the "
                           f"{dynmole.peft_config['default'].num_experts} experts are selected, else a compile "
                           "failure, logged)"})
            continue
        emit({
            "name": "dynmole_fused_chain", "shape": args.shape, "router_state": state,
            "dynmole_experts_per_token": per_token,
            "ratio_median": fused["median_s"] / rows["dynmole"]["median_s"],
            "ratio_min": fused["min_s"] / rows["dynmole"]["min_s"],
            "vs_mixlora_median": fused["median_s"] / rows["mixlora"]["median_s"],
            "compile_s": max(first_s - fused["median_s"], 0.0),
        })


if __name__ == "__main__":
    main()
