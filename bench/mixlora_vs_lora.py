"""BENCH.md ratio 1, `mixlora_vs_lora`: MixLoRA train-step time / PEFT LoRA train-step time, same shape.

LoRA: r 16, alpha 32, dropout 0.05 on q,k,v,o,gate,up,down. MixLoRA: 8 experts, top-2, expert LoRA on
gate/up/down, attention LoRA on q,k,v,o, same r/alpha/dropout. Step = forward + backward + AdamW.
Usage: python bench/mixlora_vs_lora.py [--shape small] [--repeats 10]
"""

from __future__ import annotations

from common import (
    base_model,
    emit,
    lora_config,
    mixlora_config,
    probability,
    random_batch,
    record,
    setup_threads,
    step_parser,
    time_interleaved,
    train_step_fn,
)
from peft import get_peft_model


def main() -> None:
    parser = step_parser()
    parser.add_argument("--dropout", type=probability, default=0.05, help="LoRA dropout of both adapters")
    args = parser.parse_args()
    setup_threads()
    lora = get_peft_model(base_model(args.shape), lora_config(args.dropout))
    mixlora = get_peft_model(base_model(args.shape), mixlora_config(args.dropout))
    batch = random_batch(args.shape, lora.config.vocab_size)
    times = time_interleaved(
        {"peft_lora": train_step_fn(lora, batch), "mixlora": train_step_fn(mixlora, batch)}, repeats=args.repeats
    )
    tokens = batch["input_ids"].numel()
    rows = {
        impl: record("train_step", args.shape, impl, times[impl], tokens,
                     trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
        for impl, model in (("peft_lora", lora), ("mixlora", mixlora))
    }
    emit({
        "name": "mixlora_vs_lora", "shape": args.shape, "dropout": args.dropout,
        "ratio_median": rows["mixlora"]["median_s"] / rows["peft_lora"]["median_s"],
        "ratio_min": rows["mixlora"]["min_s"] / rows["peft_lora"]["min_s"],
        "params_ratio": rows["mixlora"]["trainable_params"] / rows["peft_lora"]["trainable_params"],
    })


if __name__ == "__main__":
    main()
