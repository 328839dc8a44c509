"""BENCH.md ratio 8, `generate_vs_base` (higher is better): greedy generation tokens/s of MixLoRA, DynMoLE and,
for reference, PEFT LoRA (unmerged, same targets) over the base model's, KV cache on, same prompts. DynMoLE is measured with routers sharpened as in
dynmole_vs_mixlora.py (`--router-scale`), since near-uniform routers at init broadcast to all experts.
Usage: python bench/generate_vs_base.py [--shape small] [--new-tokens 64]
"""

from __future__ import annotations

import torch
from common import (
    BATCH,
    base_model,
    emit,
    lora_config,
    mixlora_config,
    random_batch,
    record,
    setup_threads,
    step_parser,
    time_interleaved,
)
from peft import get_peft_model

import peft_mole


def generate_fn(model, batch, new_tokens: int):
    model.eval()
    prompt = {"input_ids": batch["input_ids"][:, :32], "attention_mask": batch["attention_mask"][:, :32]}

    @torch.no_grad()
    def generate() -> None:
        model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       use_cache=True, pad_token_id=0)

    return generate


def main() -> None:
    parser = step_parser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--router-scale", type=float, default=4.0)
    args = parser.parse_args()
    setup_threads()
    base = base_model(args.shape)
    common = dict(num_experts=8, r=16, lora_alpha=32, lora_dropout=0.05)
    mixlora = get_peft_model(base_model(args.shape), mixlora_config())
    dynmole = get_peft_model(base_model(args.shape), peft_mole.DynMoLEConfig(**common))
    lora = get_peft_model(base_model(args.shape), lora_config())
    with torch.no_grad():
        for name, p in dynmole.named_parameters():
            if "router" in name:
                p.mul_(args.router_scale)
    batch = random_batch(args.shape, base.config.vocab_size)
    steps = {name: generate_fn(m, batch, args.new_tokens) for name, m in
             (("base", base), ("peft_lora", lora), ("mixlora", mixlora), ("dynmole", dynmole))}
    times = time_interleaved(steps, repeats=args.repeats)
    tokens = BATCH[args.shape][0] * args.new_tokens
    rows = {name: record("generate", args.shape, name, times[name], tokens, new_tokens=args.new_tokens)
            for name in steps}
    for name in ("peft_lora", "mixlora", "dynmole"):
        emit({"name": "generate_vs_base", "shape": args.shape, "impl": name,
              "ratio_median": rows[name]["tokens_per_s"] / rows["base"]["tokens_per_s"],
              "ratio_min": rows["base"]["min_s"] / rows[name]["min_s"]})


if __name__ == "__main__":
    main()
