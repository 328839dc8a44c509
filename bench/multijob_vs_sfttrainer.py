"""`multijob_vs_sfttrainer`: BENCH.md ratio 4 (`multijob_speedup`) as a user meets it (higher is better):
`MultiJobTrainer(jobs).train()` against the same jobs trained one after another, each by its own
`trl.SFTTrainer(peft_config=...).train()` ("plain TRL + PEFT"), same rows per job, tokens/s.

`multijob_speedup.py` compares the steps alone against a plain PEFT loop (less host work per step than
SFTTrainer); this script times the trainers end to end, with everything each does per step: data loading and
collation, logging, the learning-rate schedule, the optimizer, with `SFTConfig`'s defaults on both sides (fused
AdamW, TRL's gradient checkpointing, unless `--no-gradient-checkpointing`) but float32 on the CPU (`sft_args`).

Each job: BENCH.md's LoRA (r 16, alpha 32, dropout 0.05 on q,k,v,o,gate,up,down; `--kind mixlora` BENCH.md's
MixLoRA), `--rows-per-job` rows per step of the shape's sequence length, random token ids (no padding, so both
sides train the same tokens), `--steps` optimizer steps. Two figures, both from the same runs:
- `ratio_median` (the row's figure): steady-state tokens/s, over the steps after the first `--warmup` of each
  trainer (callbacks read `num_input_tokens_seen` and the clock at each `on_step_end`): the multi-job trainer's
  tokens over its time, against the N SFTTrainers' tokens over the sum of theirs. `--repeats` runs of both sides,
  interleaved (SFTTrainers, multi-job trainer, SFTTrainers, ...): `ratio_median` is the median of the repeats'
  ratios, `ratio_min` the lowest (not, as in the step benchmarks, the ratio of minima). Every job is in every
  mixed step here (equal rows, no memory budget), so both sides' windows hold the same job steps; the script
  checks it.
- `train_ratio`: tokens over the whole `train()` calls' wall time (first steps, the multi-job trainer's step
  grouping, the jobs' adapters saved at their ends; each SFTTrainer's `save_model()` counted on its side).
An untimed run of both sides with one job first takes the process's one-time costs (imports, first kernels).
Usage: python bench/multijob_vs_sfttrainer.py [--shape small] [--jobs 2 4 8] [--steps 13] [--warmup 3] [--repeats 3]
       [--rows-per-job 1] [--kind lora|mixlora]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time

import datasets
import torch
import transformers
from common import BATCH, base_model, emit, lora_config, mixlora_config, positive_int, setup_threads
from trl import SFTConfig, SFTTrainer

import peft_mole
from peft_mole import JobConfig, MultiJobTrainer


class StepClock(transformers.TrainerCallback):
    """(tokens seen, perf_counter) at each step's end; a mixed step of the multi-job trainer counts all its jobs'
    tokens (`num_input_tokens_seen` is the trainer's, over every job)."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((state.num_input_tokens_seen, time.perf_counter()))


def steady(marks: list[tuple[int, float]], warmup: int) -> tuple[int, float]:
    """Tokens and seconds from the end of step `warmup` to the last step's end."""
    if len(marks) <= warmup:
        raise ValueError(f"{len(marks)} steps ran, need more than --warmup {warmup}: raise --steps")
    (tokens_0, t_0), (tokens_1, t_1) = marks[warmup - 1], marks[-1]
    return tokens_1 - tokens_0, t_1 - t_0


def job_rows(jobs: int, rows: int, seq: int, vocab: int) -> list[datasets.Dataset]:
    gen = torch.Generator().manual_seed(0)
    return [datasets.Dataset.from_dict({"input_ids": torch.randint(3, vocab, (rows, seq), generator=gen).tolist()})
            for _ in range(jobs)]


def sft_args(folder: str, steps: int, rows_per_job: int, seq: int, checkpointing: bool, **extra) -> SFTConfig:
    """SFTConfig's defaults (TRL's: gradient checkpointing on, fused AdamW) but for BENCH.md's precision: bf16 on
    CUDA, float32 on the CPU (TRL's default `bf16=True` would autocast the CPU steps to bfloat16)."""
    cuda = torch.cuda.is_available()
    return SFTConfig(output_dir=folder, max_steps=steps, per_device_train_batch_size=rows_per_job, max_length=seq,
                     learning_rate=1e-4, save_strategy="no", report_to="none", bf16=cuda,
                     gradient_checkpointing=checkpointing, include_num_input_tokens_seen=True, disable_tqdm=True,
                     dataloader_num_workers=0, use_cpu=not cuda, **extra)


def sft_side(base, data, config, tokenizer, args: dict, warmup: int) -> tuple[int, float, int, float]:
    """Every job by its own SFTTrainer on a copy of the base: (steady tokens, steady s, all tokens, all s)."""
    steady_tokens = steady_s = all_tokens = all_s = 0.0
    for index, rows in enumerate(data):
        clock = StepClock()
        with tempfile.TemporaryDirectory() as folder:
            trainer = SFTTrainer(model=copy.deepcopy(base), args=sft_args(folder, **args, seed=index),
                                 train_dataset=rows, peft_config=copy.deepcopy(config), processing_class=tokenizer,
                                 callbacks=[clock])
            start = time.perf_counter()
            trainer.train()
            trainer.save_model()
            all_s += time.perf_counter() - start
        tokens, seconds = steady(clock.marks, warmup)
        steady_tokens, steady_s = steady_tokens + tokens, steady_s + seconds
        all_tokens += clock.marks[-1][0]
    return steady_tokens, steady_s, all_tokens, all_s


def multijob_side(base, data, config, tokenizer, args: dict, warmup: int) -> tuple[int, float, int, float, int]:
    """The jobs together in one MultiJobTrainer: (steady tokens, steady s, all tokens, all s, mixed steps)."""
    clock = StepClock()
    jobs = [JobConfig(name=f"job{i}", peft_config=copy.deepcopy(config), train_dataset=rows, seed=i)
            for i, rows in enumerate(data)]
    with tempfile.TemporaryDirectory() as folder:
        trainer = MultiJobTrainer(model=copy.deepcopy(base), jobs=jobs, args=sft_args(folder, **args),
                                  processing_class=tokenizer, callbacks=[clock])
        start = time.perf_counter()
        trainer.train()
        all_s = time.perf_counter() - start
    # the steady window starts once every job has taken --warmup steps: all N jobs share each mixed step here
    tokens, seconds = steady(clock.marks, warmup)
    return tokens, seconds, clock.marks[-1][0], all_s, len(clock.marks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=list(BATCH))
    parser.add_argument("--jobs", type=positive_int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=positive_int, default=13)
    parser.add_argument("--warmup", type=positive_int, default=3)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--rows-per-job", type=positive_int, default=1)
    parser.add_argument("--kind", default="lora", choices=("lora", "mixlora"))
    parser.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false",
                        help="turn off SFTConfig's default gradient checkpointing on both sides")
    options = parser.parse_args()
    if options.steps <= options.warmup:
        parser.error(f"--steps ({options.steps}) must exceed --warmup ({options.warmup})")
    setup_threads()
    _, seq = BATCH[options.shape]
    base = base_model(options.shape)
    tokenizer = peft_mole.synthetic.demo_tokenizer()
    config = lora_config() if options.kind == "lora" else mixlora_config()
    args = {"steps": options.steps, "rows_per_job": options.rows_per_job, "seq": seq,
            "checkpointing": options.checkpointing}
    with contextlib.redirect_stdout(sys.stderr):  # the trainers' logs and job tables: stdout carries JSON lines only
        warm = job_rows(1, options.rows_per_job * options.steps, seq, base.config.vocab_size)  # one-time costs of
        sft_side(base, warm, config, tokenizer, args, options.warmup)  # the process (imports, first kernels), untimed
        multijob_side(base, warm, config, tokenizer, args, options.warmup)
    for jobs in options.jobs:
        data = job_rows(jobs, options.rows_per_job * options.steps, seq, base.config.vocab_size)
        ratios, train_ratios = [], []
        for _ in range(options.repeats):
            with contextlib.redirect_stdout(sys.stderr):
                sft = sft_side(base, data, config, tokenizer, args, options.warmup)
                multi = multijob_side(base, data, config, tokenizer, args, options.warmup)
            if multi[2] != sft[2]:
                raise RuntimeError(f"the sides trained different tokens: {multi[2]} vs {sft[2]}")
            if multi[4] != options.steps:
                raise RuntimeError(f"the multi-job trainer ran {multi[4]} mixed steps, not {options.steps}: not every "
                                   "job in every step, so its steady window is not the SFTTrainers'")
            ratios.append((multi[0] / multi[1]) / (sft[0] / sft[1]))
            train_ratios.append(sft[3] / multi[3])
            emit({"name": "multijob_vs_sfttrainer_repeat", "shape": options.shape, "jobs": jobs, "kind": options.kind,
                  "sft_steady_tokens_per_s": sft[0] / sft[1], "multijob_steady_tokens_per_s": multi[0] / multi[1],
                  "sft_train_s": sft[3], "multijob_train_s": multi[3]})
        emit({"name": "multijob_vs_sfttrainer", "shape": options.shape, "jobs": jobs,
              "rows_per_job": options.rows_per_job, "dropout": 0.05, "kind": options.kind, "steps": options.steps,
              "gradient_checkpointing": options.checkpointing,
              "warmup": options.warmup, "repeats": options.repeats, "ratio_median": statistics.median(ratios),
              "ratio_min": min(ratios), "train_ratio": statistics.median(train_ratios),
              "optim": sft_args(tempfile.gettempdir(), **args).optim, "device": str(base.device),
              "transformers": transformers.__version__, "torch": torch.__version__})


if __name__ == "__main__":
    main()
