"""Train several adapters at once on one frozen base with MultiJobTrainer: four jobs (two LoRA, a MixLoRA and a
DynMoLE), each on its own task, in mixed-adapter batches; then reload each job's adapter from disk and score it.

Offline by default: a random-init tiny Llama, a tokenizer trained here and generated tasks, written under
--output-dir (default build/demo-multijob) and loaded back with `from_pretrained` / `load_dataset`.
`--prepare-only` just writes those files, which `peft-mole train examples/jobs.yaml` then uses.
On a real model: `python examples/multijob.py --model Qwen/Qwen2.5-0.5B --data-dir my_tasks/` with one
`<task>.jsonl` per task of `TASKS` (sentiment, capital, add, opposite: rows with "prompt" and "completion"), and
optionally `<task>-eval.jsonl` with rows that also carry "task" and "choices" for the accuracy after training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

import peft_mole
from peft_mole import JobConfig, MultiJobTrainer, synthetic
from peft_mole.evaluation import choice_accuracy

TASKS = {"sentiment": "lora", "capital": "mixlora", "add": "dynmole", "opposite": "lora"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or local path of a causal LM (default: a tiny random Llama)")
    parser.add_argument("--data-dir", help="folder with <task>.jsonl per job (default: generate the tasks)")
    parser.add_argument("--output-dir", default="build/demo-multijob")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--eval-rows", type=int, default=40)
    parser.add_argument("--prepare-only", action="store_true", help="write the offline model and data, then stop")
    return parser.parse_args()


def prepare_offline_assets(out: Path, model: bool = True, data: bool = True) -> list[str]:
    """Write the tiny random base (with its tokenizer) and/or the generated tasks under `out`; what was written."""
    written = []
    if model:
        tokenizer = synthetic.demo_tokenizer(save_dir=out / "base")
        base = synthetic.random_model("llama", "tiny", seed=0, vocab_size=len(tokenizer), hidden_size=128,
                                      intermediate_size=344)
        base.save_pretrained(out / "base")
        written.append(str(out / "base"))
    if not data:
        return written
    written.append(f"{out / 'data'}/<task>.jsonl and <task>-eval.jsonl")
    for i, task in enumerate(TASKS):
        synthetic.write_jsonl(synthetic.multitask_rows(400, seed=i, tasks=(task,)), out / "data" / f"{task}.jsonl")
        synthetic.write_jsonl(synthetic.multitask_rows(100, seed=100 + i, tasks=(task,)), out / "data" / f"{task}-eval.jsonl")
    return written


def peft_config(kind: str):
    if kind == "lora":
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    common = dict(num_experts=4, r=8, lora_alpha=16, lora_dropout=0.0)
    return peft_mole.MixLoRAConfig(top_k=2, **common) if kind == "mixlora" else peft_mole.DynMoLEConfig(**common)


def main() -> None:
    args = parse_args()
    out = Path(args.output_dir)
    model_path, data_dir = args.model, Path(args.data_dir) if args.data_dir else out / "data"
    written = prepare_offline_assets(out, model=args.model is None, data=args.data_dir is None)
    model_path = model_path or str(out / "base")
    if args.prepare_only:
        print(f"wrote {' and '.join(written)}" if written else "nothing to write: --model and --data-dir are given")
        return
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    jobs = []
    for i, (task, kind) in enumerate(TASKS.items()):
        train = load_dataset("json", data_files=str(data_dir / f"{task}.jsonl"), split="train")
        jobs.append(JobConfig(
            name=task, peft_config=peft_config(kind), train_dataset=train.select_columns(["prompt", "completion"]),
            learning_rate=3e-3 if kind == "lora" else 5e-3, priority=1 if task == "add" else 0,
            per_device_train_batch_size=8 if i % 2 else 16, max_steps=args.max_steps,
        ))
    trainer = MultiJobTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path), jobs=jobs, processing_class=tokenizer,
        args=SFTConfig(
            output_dir=str(out / "run"), logging_steps=max(1, args.max_steps // 5), report_to=[], save_strategy="steps",
            save_steps=max(1, args.max_steps // 2), save_total_limit=1, max_length=64, seed=0, disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        ),
    )
    trainer.train()  # prints the per-job summary table

    # (the generated tasks are small closed sets: nearly every eval prompt was also trained on, so this checks
    # that each job fitted its task, not that it generalises)
    print("accuracy of each job's adapter, reloaded from disk, on its own task (prompts also trained on):")
    status = {row["job"]: row["status"] for row in trainer.job_summary}
    for task in TASKS:
        eval_file = data_dir / f"{task}-eval.jsonl"
        if status[task] != "done":  # a failed job wrote no adapter (its folder may hold an earlier run's)
            print(f"  {task:<10} {status[task]}: not scored")
            continue
        if not eval_file.is_file():  # (optional with --data-dir)
            print(f"  {task:<10} no {eval_file.name}: not scored")
            continue
        rows = list(load_dataset("json", data_files=str(eval_file), split="train"))
        if not rows or "choices" not in rows[0]:
            continue
        rows = rows[: args.eval_rows]
        base = AutoModelForCausalLM.from_pretrained(model_path)
        before = choice_accuracy(base, tokenizer, rows)["average"]
        adapted = PeftModel.from_pretrained(base, str(out / "run" / task)).eval()
        after = choice_accuracy(adapted, tokenizer, rows)["average"]
        print(f"  {task:<10} {type(adapted.peft_config['default']).__name__:<14} {before:.2f} -> {after:.2f}")


if __name__ == "__main__":
    main()
