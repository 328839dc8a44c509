"""The training options that must keep working, measured (issue 6, part 5): gradient checkpointing and bf16/fp16
autocast, each for MixLoRA and PEFT LoRA on the same shape.

Rows `options_step` (one per option): MixLoRA step / PEFT LoRA step under that option, and each model's step
under the option / its plain fp32 eager step (what the option costs or saves). Options:
    eager          fp32, no checkpointing (the reference)
    checkpointing  `model.gradient_checkpointing_enable(use_reentrant=False)` (transformers' per-layer recompute)
    bf16_autocast  `torch.autocast(device, dtype=torch.bfloat16)` around forward and loss (the router stays fp32)
    fp16_autocast  the same with torch.float16 (a GPU run would add Trainer's gradient scaler; not timed here)
Usage: python bench/options_step.py [--shape small] [--repeats 10] [--options eager checkpointing ...]
"""

from __future__ import annotations

import torch
from common import (
    base_model,
    device,
    emit,
    lora_config,
    mixlora_config,
    random_batch,
    record,
    setup_threads,
    step_parser,
    time_interleaved,
    train_step_fn,
)
from peft import get_peft_model


def build(kind: str, shape: str, checkpointing: bool):
    base = base_model(shape)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    return get_peft_model(base, lora_config() if kind == "peft_lora" else mixlora_config())


def main() -> None:
    parser = step_parser()
    every = {"eager": (False, None), "checkpointing": (True, None), "bf16_autocast": (False, torch.bfloat16),
             "fp16_autocast": (False, torch.float16)}
    parser.add_argument("--options", nargs="+", choices=list(every), default=None,
                        help="default: all, except fp16_autocast on CPU (a CPU without AVX512-FP16 has no fp16 matrix "
                             "kernels: ~20-30x slower than fp32, so it is run on its own); eager is always run")
    args = parser.parse_args()
    setup_threads()
    chosen = args.options or [o for o in every if o != "fp16_autocast" or device().type == "cuda"]
    options = {o: every[o] for o in every if o == "eager" or o in chosen}
    steps, tokens = {}, 0
    for option, (checkpointing, autocast) in options.items():
        for kind in ("peft_lora", "mixlora"):
            model = build(kind, args.shape, checkpointing)
            batch = random_batch(args.shape, model.config.vocab_size)
            tokens = batch["input_ids"].numel()
            steps[option, kind] = train_step_fn(model, batch, autocast)
    times = time_interleaved({f"{o}/{k}": s for (o, k), s in steps.items()}, repeats=args.repeats)
    rows = {key: record("options_train_step", args.shape, key, secs, tokens) for key, secs in times.items()}
    for option in [o for o in options if o in chosen]:  # eager is only the reference unless asked for
        mix, lora = rows[f"{option}/mixlora"], rows[f"{option}/peft_lora"]
        emit({
            "name": "options_step", "shape": args.shape, "impl": option,
            "ratio_median": mix["median_s"] / lora["median_s"], "ratio_min": mix["min_s"] / lora["min_s"],
            "mixlora_vs_eager": mix["median_s"] / rows["eager/mixlora"]["median_s"],
            "lora_vs_eager": lora["median_s"] / rows["eager/peft_lora"]["median_s"], "repeats": args.repeats,
        })


if __name__ == "__main__":
    main()
