"""Learning check (not a pass/fail test): LoRA (parameter-matched r), MixLoRA and DynMoLE trained with the same
steps, data and seeds on the synthetic multi-task set; final eval loss (completion tokens, LM loss only) and
task accuracy (answer-choice scoring) per method, mean ± std over seeds. One JSON line per run, then a summary.

Usage: python bench/learning_check.py [--steps 300] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

import peft_mole
from peft_mole import synthetic
from peft_mole.evaluation import choice_accuracy

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def configs(lora_r: int) -> dict:
    moe = dict(num_experts=8, r=16, lora_alpha=32, lora_dropout=0.05)
    return {
        f"lora_r{lora_r}": LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05, target_modules=TARGETS),
        "mixlora": peft_mole.MixLoRAConfig(top_k=2, **moe),
        "dynmole": peft_mole.DynMoLEConfig(**moe),
    }


@torch.no_grad()
def completion_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean NLL of the completion tokens given the prompt (LM loss only, no router aux loss)."""
    model.eval()
    total, count = 0.0, 0
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum").item()
        count += len(answer)
    return total / count


def run(name, config, seed, steps, lr, tokenizer, train, eval_rows) -> dict:
    base = synthetic.random_model("llama", "tiny", seed=0, vocab_size=len(tokenizer), hidden_size=128,
                                  intermediate_size=344)
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=base, train_dataset=train, processing_class=tokenizer, peft_config=config,
            args=SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=16, learning_rate=lr,
                           report_to=[], save_strategy="no", max_length=128, seed=seed, disable_tqdm=True,
                           logging_steps=steps, use_cpu=True),
        )
        params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    row = {
        "name": "learning_check", "method": name, "seed": seed, "steps": steps, "learning_rate": lr,
        "trainable_params": params,
        "eval_loss": completion_loss(trainer.model, tokenizer, eval_rows),
        "accuracy": choice_accuracy(trainer.model, tokenizer, eval_rows),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lora-r", type=int, default=80, help="80 matches MixLoRA's trainable parameters here")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--methods", nargs="+", default=None, help="subset of: lora_r<R> mixlora dynmole")
    args = parser.parse_args()
    if args.steps < 1 or args.lora_r < 1:
        parser.error("--steps and --lora-r must be at least 1")
    known = list(configs(args.lora_r))
    unknown = sorted(set(args.methods or []) - set(known))
    if unknown:
        parser.error(f"--methods {unknown} are not among {known} (lora_r<R> follows --lora-r)")
    torch.set_num_threads(2)
    tokenizer = synthetic.demo_tokenizer()
    rows = synthetic.multitask_rows(2000, seed=0)
    train = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    eval_rows = synthetic.multitask_rows(200, seed=1)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for name, config in configs(args.lora_r).items():
            if args.methods and name not in args.methods:
                continue
            row = run(name, config, seed, args.steps, args.learning_rate, tokenizer, train, eval_rows)
            results.setdefault(name, []).append(row)
    for name, runs in results.items():
        losses = [r["eval_loss"] for r in runs]
        accs = [r["accuracy"]["average"] for r in runs]
        print(json.dumps({
            "name": "learning_check_summary", "method": name, "seeds": len(runs), "seed_list": args.seeds,
            "steps": args.steps,
            "learning_rate": args.learning_rate,
            "trainable_params": runs[0]["trainable_params"],
            "eval_loss_mean": statistics.mean(losses), "eval_loss_std": statistics.pstdev(losses),
            "accuracy_mean": statistics.mean(accs), "accuracy_std": statistics.pstdev(accs),
            "per_task_mean": {t: statistics.mean(r["accuracy"][t] for r in runs) for t in runs[0]["accuracy"]},
        }), flush=True)


if __name__ == "__main__":
    main()
