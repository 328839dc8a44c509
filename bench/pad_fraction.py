"""BENCH.md ratio 7, `pad_fraction`: padding tokens / all tokens in the mixed batches MultiJobTrainer builds, on
jobs whose row lengths follow a long-tailed (log-normal) distribution.

Settings: one mixed step per round (no grouping); length-aware grouping of a round into steps
(`step_overhead_tokens="auto"`, the default: the cost of a step fitted from measured step times), with the LoRA
jobs' micro-batches cut into rows (the default) and, as an ablation, kept whole; the same with Trainer's
`group_by_length` sampler inside each job; and TRL's `padding_free=True`, where every mixed step is one packed row
(no padding; the attention mask is block-diagonal instead), also with `attn_implementation="sdpa_packed"` (each
packed sequence's attention apart, so every round's micro-batches go in one step). `micro_batch_pad_fraction` is the
padding already in the jobs' own micro-batches (their collators'). Each setting also reports its mixed steps,
seconds and real tokens per second. The padding-free run trains on the same tokens: the rows as SFTTrainer prepared
them for the padded runs (truncated to 256 tokens), since TRL does not truncate under `padding_free`.
Usage: python bench/pad_fraction.py [--shape small] [--jobs 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import time

from common import emit, positive_int, setup_threads
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig

from peft_mole import PACKED_SDPA, JobConfig, MultiJobTrainer, packed_attention, synthetic

WORDS = ["red", "blue", "cat", "dog", "sun", "rain", "tree", "road", "fish", "bird", "stone", "light"]


def long_tailed_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = min(max(int(rng.lognormvariate(3.0, 0.8)), 2), 200)  # median ~20 words, long right tail
        rows.append({"text": " ".join(rng.choice(WORDS) for _ in range(words))})
    return rows


WARMUP_ROUNDS = 3  # BENCH.md's warm-up steps: rounds not timed for the real tokens per second
PREPARED: dict[str, Dataset] = {}  # job -> its rows as SFTTrainer prepared them (tokenised, truncated)


def run(shape: str, jobs: int, steps: int, overhead: int | str | None, sampling: str, cut_rows: bool,
        padding_free: bool = False, attention: str = "sdpa") -> dict:
    """Pad fraction of the mixed batches and of the jobs' own micro-batches, fitted step overhead in tokens, mixed
    steps, training seconds and real tokens per second."""
    tokenizer = synthetic.demo_tokenizer()
    job_list = [
        JobConfig(f"job{i}", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                  PREPARED[f"job{i}"].select_columns(["input_ids"]) if padding_free
                  else Dataset.from_list(long_tailed_rows(400, seed=i)), per_device_train_batch_size=2 + i % 3)
        for i in range(jobs)
    ]
    base = synthetic.random_model("llama", shape, vocab_size=len(tokenizer))
    base.set_attn_implementation(attention)
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):  # stdout: JSON lines only
        trainer = MultiJobTrainer(
            model=base, jobs=job_list,
            processing_class=tokenizer, step_overhead_tokens=overhead,
            args=SFTConfig(output_dir=out, max_steps=steps, max_length=None if padding_free else 256, report_to=[],
                           save_strategy="no", padding_free=padding_free,
                           use_cpu=True, bf16=False, disable_tqdm=True, logging_steps=steps,
                           train_sampling_strategy=sampling, gradient_checkpointing=False),
        )
        if not padding_free:
            PREPARED.update(trainer.job_datasets)
        if not cut_rows:  # ablation: every micro-batch stays whole, as before LoRA micro-batches were cut into rows
            trainer._rows_splittable = lambda run: False
        steps_taken, rounds = [], []
        forward_backward, train_round = trainer._forward_backward, trainer._train_round
        trainer._forward_backward = lambda parts: (steps_taken.append(1), forward_backward(parts))[1]

        def timed_round(parts) -> None:  # one micro-batch of every job: its seconds and real tokens
            real, start = trainer.padding_stats.real, time.perf_counter()
            train_round(parts)
            rounds.append((time.perf_counter() - start, trainer.padding_stats.real - real))

        trainer._train_round = timed_round
        trainer.train()
        # the rounds after the warm-up ones (before 2026-12-06 the whole `train()`: set-up and first steps too)
        timed = rounds[WARMUP_ROUNDS:] if len(rounds) > WARMUP_ROUNDS else rounds
        seconds, real = sum(t for t, _ in timed), sum(n for _, n in timed)
        stats = trainer.padding_stats
        return {"pad_fraction": stats.pad_fraction, "micro_batch_pad_fraction": stats.micro_batch_pad_fraction,
                "overhead_tokens": trainer.step_cost.overhead_tokens(), "mixed_steps": len(steps_taken),
                "timed_rounds": len(timed), "seconds": seconds, "real_tokens_per_s": real / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=["tiny", "small"])
    parser.add_argument("--jobs", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=20)
    args = parser.parse_args()
    setup_threads()
    settings = {
        "one_step_per_round": (None, "random", False),
        "length_grouping_whole_micro_batches": ("auto", "random", False),
        "length_grouping": ("auto", "random", True),
        "length_grouping+group_by_length_whole_micro_batches": ("auto", "group_by_length", False),
        "length_grouping+group_by_length": ("auto", "group_by_length", True),
        "padding_free": ("auto", "random", True, True),
        "padding_free_sdpa_packed": ("auto", "random", True, True, PACKED_SDPA),
    }
    results = {name: run(args.shape, args.jobs, args.steps, *setting) for name, setting in settings.items()}
    best = results["length_grouping+group_by_length"]
    emit({"name": "pad_fraction", "shape": args.shape, "jobs": args.jobs, "steps": args.steps,
          "ratio_median": best["pad_fraction"], "ratio_min": best["pad_fraction"],
          "micro_batch_pad_fraction": best["micro_batch_pad_fraction"],
          "fitted_step_overhead_tokens": best["overhead_tokens"],
          **{name: result["pad_fraction"] for name, result in results.items()},
          "cut_rows_speedup": results["length_grouping"]["real_tokens_per_s"]
          / results["length_grouping_whole_micro_batches"]["real_tokens_per_s"],
          "padding_free_speedup": results["padding_free"]["real_tokens_per_s"]
          / results["length_grouping"]["real_tokens_per_s"],
          "padding_free_sdpa_packed_speedup": results["padding_free_sdpa_packed"]["real_tokens_per_s"]
          / results["length_grouping"]["real_tokens_per_s"],
          "chunk_tokens": packed_attention.CHUNK_TOKENS,  # (the sdpa_packed setting's)
          "padding_free_vs_group_by_length": results["padding_free"]["real_tokens_per_s"]
          / results["length_grouping+group_by_length"]["real_tokens_per_s"],
          "details": results})


if __name__ == "__main__":
    main()
