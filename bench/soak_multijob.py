"""Soak test of MultiJobTrainer (not in CI): jobs arrive, finish, fail and are resumed for --minutes on CPU.

Each session builds a MultiJobTrainer over the jobs that have arrived so far, trains until a callback interrupts
it after a random number of mixed steps (a crash stand-in), and the next session resumes every unfinished job from
its checkpoints. Every few arrivals a job is poisoned (its adapter set to NaN mid-run) and must fail alone. At the
end every finished job's adapter is loaded back with `PeftModel.from_pretrained` and checked finite.
Prints one JSON line: sessions, mixed steps, job steps, jobs done/failed, RSS at the start and end (drift).
Usage: python bench/soak_multijob.py [--minutes 20] [--output-dir build/soak]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import sys
import time

import torch
from common import setup_threads
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import TrainerCallback
from trl import SFTConfig

import peft_mole
from peft_mole import JobConfig, MultiJobTrainer, synthetic


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Interrupt(TrainerCallback):
    """Stop the session after `steps` mixed steps; poison one job's adapter at a given step."""

    def __init__(self, trainer, steps: int, poison: str | None, poison_at: int) -> None:
        self.trainer, self.steps, self.poison, self.poison_at = trainer, steps, poison, poison_at

    def on_step_end(self, args, state, control, **kwargs):
        if self.poison and state.global_step == self.poison_at and self.poison in self.trainer.jobs_model.peft_config:
            with torch.no_grad():
                for p in self.trainer.jobs_model.job_parameters(self.poison).values():
                    p.fill_(float("nan"))
        if state.global_step >= self.steps:
            control.should_training_stop = True


def make_job(index: int, rng: random.Random) -> JobConfig:
    kind = ["lora", "mixlora", "dynmole"][index % 3]
    task = synthetic.TASKS[index % len(synthetic.TASKS)]
    rows = synthetic.multitask_rows(64, seed=index, tasks=(task,))
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    config = {
        "lora": lambda: LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]),
        "mixlora": lambda: peft_mole.MixLoRAConfig(num_experts=4, top_k=2, r=8, lora_dropout=0.0),
        "dynmole": lambda: peft_mole.DynMoLEConfig(num_experts=4, r=8, lora_dropout=0.0),
    }[kind]()
    return JobConfig(f"job{index:03d}", config, data, max_steps=rng.randint(20, 60),
                     per_device_train_batch_size=rng.choice([2, 4, 8]), gradient_accumulation_steps=rng.choice([1, 2]),
                     learning_rate=rng.choice([1e-3, 3e-3]), save_steps=5, priority=rng.randint(0, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--output-dir", default="build/soak")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setup_threads()
    rng = random.Random(args.seed)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    tokenizer = synthetic.demo_tokenizer()
    base = synthetic.random_model("llama", "tiny", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344)
    base.save_pretrained(os.path.join(args.output_dir, "base"))
    deadline = time.time() + 60 * args.minutes
    arrived: list[JobConfig] = []
    poisoned: set[str] = set()
    totals = {"sessions": 0, "mixed_steps": 0, "resumed_sessions": 0}
    rss_start = rss_mb()
    rss_after_sessions = []
    status: dict[str, dict] = {}
    while time.time() < deadline:
        for _ in range(rng.randint(1, 3)):  # new arrivals
            arrived.append(make_job(len(arrived), rng))
        active = [j for j in arrived if status.get(j.name, {}).get("status") not in ("done", "failed")]
        if not active:
            continue
        poison = None
        if totals["sessions"] % 4 == 3:
            poison = rng.choice(active).name
            poisoned.add(poison)
        sft = SFTConfig(output_dir=args.output_dir, max_length=48, report_to=[], use_cpu=True, bf16=False,
                        save_strategy="steps", save_total_limit=2, logging_steps=10, disable_tqdm=True,
                        gradient_checkpointing=False, seed=0)
        model = peft_mole.synthetic.random_model("llama", "tiny", vocab_size=len(tokenizer), hidden_size=128,
                                                 intermediate_size=344)
        with contextlib.redirect_stdout(sys.stderr):
            trainer = MultiJobTrainer(model=model, jobs=active, args=sft, processing_class=tokenizer,
                                      max_concurrent_jobs=4)
            trainer.add_callback(Interrupt(trainer, rng.randint(10, 40), poison, rng.randint(2, 8)))
            resume = totals["sessions"] > 0
            trainer.train(resume_from_checkpoint=True if resume else None)
        totals["sessions"] += 1
        totals["resumed_sessions"] += int(resume)
        totals["mixed_steps"] += trainer.state.global_step
        for row in trainer.job_summary:
            status[row["job"]] = row
        del trainer, model
        gc.collect()
        rss_after_sessions.append(rss_mb())
    done = [name for name, row in status.items() if row["status"] == "done"]
    failed = [name for name, row in status.items() if row["status"] == "failed"]
    finite = 0
    for name in done:
        adapter = PeftModel.from_pretrained(
            synthetic.random_model("llama", "tiny", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344),
            os.path.join(args.output_dir, name))
        finite += all(torch.isfinite(p).all() for n, p in adapter.named_parameters() if "lora" in n or "mixlora" in n
                      or "dynmole" in n)
    print(json.dumps({
        "name": "soak_multijob", "minutes": args.minutes, **totals, "jobs_arrived": len(arrived),
        "jobs_done": len(done), "jobs_failed": len(failed), "poisoned": len(poisoned),
        # a poisoned job fails unless the NaN is overwritten first by resuming it from its last good checkpoint
        "failed_were_poisoned": set(failed) <= poisoned,
        "done_adapters_load_finite": finite,
        "job_steps": sum(row["steps"] for row in status.values()),
        "rss_mb_start": round(rss_start, 1), "rss_mb_first_session": round(rss_after_sessions[0], 1),
        "rss_mb_end": round(rss_after_sessions[-1], 1), "rss_mb_max": round(max(rss_after_sessions), 1),
    }))


if __name__ == "__main__":
    main()
