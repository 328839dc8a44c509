"""torch.profiler breakdown of one train step (forward + backward + AdamW) of MixLoRA and of PEFT LoRA.

Forward time is grouped by the named ranges of peft_mole (route, dispatch, experts_pairs — the blockwise
pair function —, experts_dense, and on the step-by-step path experts_gate_up, combine, experts_down) and the
model's modules (attention, MLP); backward and optimizer are reported whole.
Prints JSON lines, then the top operators of the MixLoRA step.
Usage: python bench/profile_step.py [--shape small] [--steps 3]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from common import base_model, emit, lora_config, mixlora_config, random_batch, setup_threads, train_step_fn
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile, record_function

RANGES = ("peft_mole::route", "peft_mole::dispatch", "peft_mole::experts_pairs", "peft_mole::experts_dense",
          "peft_mole::experts_gate_up", "peft_mole::combine",
          "peft_mole::experts_down", "forward", "backward", "optimizer")


def profiled_steps(model, batch, steps: int):
    model.train()
    step = train_step_fn(model, batch)
    for _ in range(3):
        step()
    optimizer = __import__("torch").optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("forward"):
                loss = model(**batch).loss
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return prof


def breakdown(prof, steps: int) -> dict[str, float]:
    totals = defaultdict(float)
    for event in prof.key_averages():
        if event.key in RANGES:
            totals[event.key] += event.cpu_time_total / 1000 / steps  # ms per step
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    setup_threads()
    models = {
        "peft_lora": get_peft_model(base_model(args.shape), lora_config()),
        "mixlora": get_peft_model(base_model(args.shape), mixlora_config()),
    }
    batch = random_batch(args.shape, models["mixlora"].config.vocab_size)
    for impl, model in models.items():
        prof = profiled_steps(model, batch, args.steps)
        emit({"name": "profile_step", "shape": args.shape, "impl": impl, "ms_per_step": breakdown(prof, args.steps)})
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
