"""`eval_throughput` (issue 7): adapters evaluated per minute on the commonsense protocol, 4 MixLoRA adapters in
one pass (mixed-adapter batches: the frozen base runs once per batch for all of them) vs one at a time.

Small shape (CPU), generated ARC/BoolQ-schema tasks (64 questions each), batch 8, interleaved repeats.
Usage: python bench/eval_throughput.py [--shape small] [--adapters 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import emit, positive_int, setup_threads
from peft import get_peft_model

import peft_mole
from peft_mole import synthetic
from peft_mole.evaluation import evaluate_commonsense, load_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=["tiny", "small"])
    parser.add_argument("--adapters", type=positive_int, default=4)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--rows", type=positive_int, default=64)
    args = parser.parse_args()
    setup_threads()
    with tempfile.TemporaryDirectory() as folder:
        synthetic.write_commonsense_tasks(folder, args.rows)
        tokenizer = synthetic.commonsense_tokenizer(folder)
        tasks = {name: load_task(name, folder) for name in ("arc_e", "boolq")}
    names = [f"adapter{i}" for i in range(args.adapters)]
    model = get_peft_model(synthetic.random_model("llama", args.shape, vocab_size=len(tokenizer)),
                           peft_mole.MixLoRAConfig(num_experts=8, top_k=2, r=16), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft_mole.MixLoRAConfig(num_experts=8, top_k=2, r=16))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    one_pass, one_by_one = [], []
    evaluate_commonsense(model, tokenizer, {"boolq": tasks["boolq"][:8]}, adapters=names)  # warm-up
    for _ in range(args.repeats):
        start = time.perf_counter()
        evaluate_commonsense(model, tokenizer, tasks, adapters=names)
        one_pass.append(time.perf_counter() - start)
        start = time.perf_counter()
        for name in names:
            evaluate_commonsense(model, tokenizer, tasks, adapters=[name])
        one_by_one.append(time.perf_counter() - start)
    per_minute = {k: 60 * args.adapters / statistics.median(v) for k, v in (("one_pass", one_pass),
                                                                           ("one_at_a_time", one_by_one))}
    emit({"name": "eval_throughput", "shape": args.shape, "adapters": args.adapters,
          "questions": sum(len(v) for v in tasks.values()),
          "adapters_per_min_one_pass": per_minute["one_pass"],
          "adapters_per_min_one_at_a_time": per_minute["one_at_a_time"],
          "ratio_median": per_minute["one_pass"] / per_minute["one_at_a_time"],
          "ratio_min": min(one_by_one) / min(one_pass)})  # (the fastest of each; was a median over a minimum)


if __name__ == "__main__":
    main()
