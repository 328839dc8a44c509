"""BENCH.md ratio 7, `pad_fraction`: padding tokens / all tokens in the mixed batches MultiJobTrainer builds, on
jobs whose row lengths follow a long-tailed (log-normal) distribution.

Three settings: one mixed step per round (no grouping); length-aware grouping of a round into steps
(`step_overhead_tokens="auto"`, the default: the cost of a step fitted from measured step times); grouping plus
Trainer's `group_by_length` sampler inside each job. `micro_batch_pad_fraction` is the padding already in the jobs'
own micro-batches (their collators'), which the scheduler does not change: the floor for the mixed batches.
Usage: python bench/pad_fraction.py [--shape small] [--jobs 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile

from common import emit, setup_threads
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig

from peft_mole import JobConfig, MultiJobTrainer, synthetic

WORDS = ["red", "blue", "cat", "dog", "sun", "rain", "tree", "road", "fish", "bird", "stone", "light"]


def long_tailed_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = min(max(int(rng.lognormvariate(3.0, 0.8)), 2), 200)  # median ~20 words, long right tail
        rows.append({"text": " ".join(rng.choice(WORDS) for _ in range(words))})
    return rows


def run(shape: str, jobs: int, steps: int, overhead: int | str | None, sampling: str) -> tuple[float, float, int]:
    """(pad fraction of the mixed batches, of the jobs' own micro-batches, fitted step overhead in tokens)."""
    tokenizer = synthetic.demo_tokenizer()
    job_list = [
        JobConfig(f"job{i}", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                  Dataset.from_list(long_tailed_rows(400, seed=i)), per_device_train_batch_size=2 + i % 3)
        for i in range(jobs)
    ]
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):  # stdout: JSON lines only
        trainer = MultiJobTrainer(
            model=synthetic.random_model("llama", shape, vocab_size=len(tokenizer)), jobs=job_list,
            processing_class=tokenizer, step_overhead_tokens=overhead,
            args=SFTConfig(output_dir=out, max_steps=steps, max_length=256, report_to=[], save_strategy="no",
                           use_cpu=True, bf16=False, disable_tqdm=True, logging_steps=steps,
                           train_sampling_strategy=sampling, gradient_checkpointing=False),
        )
        trainer.train()
        stats = trainer.padding_stats
        return stats.pad_fraction, stats.micro_batch_pad_fraction, trainer.step_cost.overhead_tokens()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=["tiny", "small"])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    setup_threads()
    settings = {"one_step_per_round": (None, "random"), "length_grouping": ("auto", "random"),
                "length_grouping+group_by_length": ("auto", "group_by_length")}
    results = {name: run(args.shape, args.jobs, args.steps, *setting) for name, setting in settings.items()}
    best = results["length_grouping+group_by_length"]
    emit({"name": "pad_fraction", "shape": args.shape, "jobs": args.jobs, "steps": args.steps,
          "ratio_median": best[0], "ratio_min": best[0], "micro_batch_pad_fraction": best[1],
          "fitted_step_overhead_tokens": best[2], **{name: fraction for name, (fraction, _, _) in results.items()}})


if __name__ == "__main__":
    main()
