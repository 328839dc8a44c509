"""`torch.compile` of a MixLoRA model (issue 6): compile time and train-step time against eager, small shape.

Step = forward + backward + AdamW (BENCH.md). The compiled model is `torch.compile(peft_model)`; routing makes
shapes data-dependent (tokens per expert), so the compiler may fall back or recompile — both are measured.
Usage: python bench/compile_step.py [--shape small] [--repeats 10]
"""

from __future__ import annotations

import time

import torch
from common import (
    base_model,
    emit,
    mixlora_config,
    random_batch,
    record,
    setup_threads,
    step_parser,
    synchronize,
    time_interleaved,
    train_step_fn,
)
from peft import get_peft_model


def main() -> None:
    parser = step_parser()
    args = parser.parse_args()
    setup_threads()
    eager = get_peft_model(base_model(args.shape), mixlora_config())
    compiled_model = get_peft_model(base_model(args.shape), mixlora_config())
    batch = random_batch(args.shape, eager.config.vocab_size)
    compiled = torch.compile(compiled_model)
    compiled_step = train_step_fn(compiled, batch)
    start = time.perf_counter()
    error = None
    try:
        compiled_step()  # first call compiles
        synchronize()
    except Exception as failure:  # noqa: BLE001 — reported, not hidden
        error = f"{type(failure).__name__}: {str(failure)[:300]}"
    compile_s = time.perf_counter() - start
    if error is not None:
        emit({"name": "compile_step", "shape": args.shape, "error": error, "compile_s": compile_s})
        return
    times = time_interleaved({"eager": train_step_fn(eager, batch), "compiled": compiled_step}, repeats=args.repeats)
    tokens = batch["input_ids"].numel()
    rows = {impl: record("train_step", args.shape, f"mixlora_{impl}", t, tokens) for impl, t in times.items()}
    emit({"name": "compile_step", "shape": args.shape, "compile_s": compile_s,
          "ratio_median": rows["compiled"]["median_s"] / rows["eager"]["median_s"],
          "ratio_min": rows["compiled"]["min_s"] / rows["eager"]["min_s"]})


if __name__ == "__main__":
    main()
