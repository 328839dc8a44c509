"""Evaluate several adapters on commonsense tasks in ONE pass over the data (mixed-adapter batches), and compare
the time with evaluating them one after another.

Offline by default: a tiny random Llama, a tokenizer trained here, 4 random MixLoRA adapters and two small tasks
generated in the ARC and BoolQ Hub schemas (written to --output-dir and read back with `load_task(data_dir=...)`).
The one-time costs (loading `evaluate`'s accuracy metric, the first forward) are paid in a warm-up before either
way is timed.
On real adapters: `python examples/evaluate_adapters.py --model Qwen/Qwen2.5-0.5B --adapters runs/a,runs/b
--tasks arc_e,boolq` (with --model and no --data-dir the tasks come from the Hub). The adapters share one model,
so they must be of one PEFT type (`peft-mole eval` takes several types, one pass per type).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_mole
from peft_mole import synthetic
from peft_mole.evaluation import evaluate_commonsense, load_task


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model: hub id or path (default: a tiny random Llama)")
    parser.add_argument("--adapters", help="comma-separated adapter folders or hub ids (default: 4 random ones)")
    parser.add_argument("--tasks", default="arc_e,boolq")
    parser.add_argument("--data-dir", help="<task>.jsonl files in the Hub schema (default: generated)")
    parser.add_argument("--output-dir", default="build/demo-evaluate")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.output_dir)
    torch.manual_seed(0)
    if args.data_dir is None and args.model is None:  # the offline demo: generated tasks (else the Hub's)
        synthetic.write_commonsense_tasks(out / "data", args.limit)
        args.data_dir = str(out / "data")
    if args.model is None:  # a tokenizer that knows the tasks' text and gives each option label " A".." D" a token
        tokenizer = synthetic.commonsense_tokenizer(args.data_dir, save_dir=out / "base")  # (the tasks scored)
        synthetic.random_model("llama", "tiny", vocab_size=len(tokenizer)).save_pretrained(out / "base")
        args.model = str(out / "base")
    if args.adapters is None:
        folders = []
        for i in range(4):
            adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model),
                                     peft_mole.MixLoRAConfig(num_experts=4, r=8))
            with torch.no_grad():  # random experts and routers, so the adapters disagree; one stream per adapter,
                generator = torch.Generator().manual_seed(i)  # so its layers and projections differ too (a swap
                for p in adapter.parameters():  # of two would change the scores)
                    if p.requires_grad:
                        p.normal_(0, 0.1, generator=generator)
            adapter.save_pretrained(out / f"adapter{i}")
            folders.append(str(out / f"adapter{i}"))
        args.adapters = ",".join(folders)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    paths = args.adapters.split(",")
    kinds = {str(PeftConfig.from_pretrained(path).peft_type) for path in paths}
    if len(kinds) > 1:
        raise SystemExit(f"--adapters must be of one PEFT type to share a model, got {sorted(kinds)}; "
                         "`peft-mole eval` evaluates several types, one pass per type")
    names = [f"adapter{i}" for i in range(len(paths))]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model), paths[0], adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:], strict=True):
        model.load_adapter(path, adapter_name=name)
    tasks = {t: load_task(t, args.data_dir, limit=args.limit) for t in args.tasks.split(",")}

    # one-time costs before timing (loading `evaluate`'s accuracy metric, the first forward), so that neither
    # way of evaluating pays them: a few examples of each task, every adapter
    warm_up = {t: examples[: args.batch_size] for t, examples in tasks.items()}
    evaluate_commonsense(model, tokenizer, warm_up, adapters=names, batch_size=args.batch_size)
    start = time.perf_counter()
    together = evaluate_commonsense(model, tokenizer, tasks, adapters=names, batch_size=args.batch_size)
    one_pass = time.perf_counter() - start
    start = time.perf_counter()
    alone = {}
    for name in names:
        alone.update(evaluate_commonsense(model, tokenizer, tasks, adapters=[name], batch_size=args.batch_size))
    one_by_one = time.perf_counter() - start
    print("| adapter | " + " | ".join(tasks) + " | average |")
    for name in names:
        scores = [together[name][t] for t in tasks] + [together[name]["average"]]
        print(f"| {name} | " + " | ".join(f"{score:.3f}" for score in scores) + " |")
    same = all(abs(together[n][t] - alone[n][t]) < 1e-9 for n in names for t in tasks)
    print(f"one pass: {60 * len(names) / one_pass:.1f} adapters/min; one at a time: "
          f"{60 * len(names) / one_by_one:.1f} adapters/min; same accuracies: {same}")


if __name__ == "__main__":
    main()
