"""BENCH.md ratio 5, `multijob_memory`: peak memory of N LoRA jobs trained in one process, compared with
(a) one base + N × adapter state (parameters, gradients and AdamW moments: 4 × adapter bytes), and
(b) N separate processes that each train one job (the way without multi-job training): N × their peak RSS less
    their file-backed pages (the shared libraries, which N processes hold once), plus those pages once.

Each configuration runs in a fresh child process that trains 3 steps (rows_per_job rows of the shape's length per
job) and reports its peak RSS (CPU) or peak CUDA memory; a child that only loads the base gives the base cost.
Usage: python bench/multijob_memory.py [--shape small] [--jobs 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from common import BATCH, base_model, emit, peak_memory_mb, positive_int, setup_threads
from multijob_speedup import lora_config, mixed_step_fn, rows_batch
from peft import get_peft_model

from peft_mole.multijob import MultiJobModel


def child(shape: str, mode: str, jobs: int, rows_per_job: int) -> None:
    setup_threads()
    seq = BATCH[shape][1]
    base = base_model(shape)
    adapter_bytes = 0
    if mode == "multi":
        names = [f"job{i}" for i in range(jobs)]
        model = MultiJobModel(base, {name: lora_config() for name in names})
        adapter_bytes = sum(p.numel() * p.element_size() for p in model.job_parameters(names[0]).values())
        step = mixed_step_fn(model, rows_batch(jobs * rows_per_job, seq, base.config.vocab_size), names, rows_per_job)
    elif mode in ("single", "single_all_rows"):
        from common import train_step_fn

        model = get_peft_model(base, lora_config())
        rows = rows_per_job * (jobs if mode == "single_all_rows" else 1)
        step = train_step_fn(model, rows_batch(rows, seq, base.config.vocab_size))
    else:  # the base alone, loaded and idle
        step = lambda: None  # noqa: E731
    for _ in range(3):
        step()
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters() if not p.requires_grad)
    print(json.dumps({"peak_mb": peak_memory_mb(), "adapter_mb": adapter_bytes / 2**20, "base_mb": base_bytes / 2**20,
                      "file_mb": file_backed_mb()}))


def file_backed_mb() -> float:
    """This process's resident file-backed pages (`RssFile`: the shared libraries, mostly), which processes on one
    machine share; 0 on CUDA (the peak there is the device's) or without /proc."""
    if torch.cuda.is_available():
        return 0.0
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssFile:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def measure(shape: str, mode: str, jobs: int, rows_per_job: int) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--shape", shape, "--jobs", str(jobs),
               "--rows-per-job", str(rows_per_job)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--jobs", type=positive_int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rows-per-job", type=positive_int, default=1)
    parser.add_argument("--child", choices=["multi", "single", "single_all_rows", "base"])
    args = parser.parse_args()
    if args.child:
        child(args.shape, args.child, args.jobs[0], args.rows_per_job)
        return
    setup_threads()  # (the children's threads: the rows record this process's; before 2026-12-07 torch's default)
    base_only = measure(args.shape, "base", 1, args.rows_per_job)
    single = measure(args.shape, "single", 1, args.rows_per_job)
    for n in args.jobs:
        multi = measure(args.shape, "multi", n, args.rows_per_job)
        # one adapter over the same N rows: the same base and activations, so the difference should be
        # the other N - 1 adapters' state (parameters, gradients, two AdamW moments)
        same_rows = measure(args.shape, "single_all_rows", n, args.rows_per_job)
        model_mb = base_only["peak_mb"] + n * 4 * multi["adapter_mb"]
        # N processes share their library pages: counted once (a plain sum of peak RSS flattered one process)
        processes_mb = n * (single["peak_mb"] - single.get("file_mb", 0.0)) + single.get("file_mb", 0.0)
        emit({
            "name": "multijob_memory", "shape": args.shape, "jobs": n, "rows_per_job": args.rows_per_job,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "peak_mb_one_process": multi["peak_mb"], "peak_mb_per_single_job_process": single["peak_mb"],
            "base_process_mb": base_only["peak_mb"], "adapter_mb": multi["adapter_mb"],
            "ratio_vs_base_plus_adapters": multi["peak_mb"] / model_mb,
            "ratio_vs_n_processes_rss": multi["peak_mb"] / (n * single["peak_mb"]),
            "shared_file_mb": single.get("file_mb", 0.0),
            "ratio_vs_n_processes": multi["peak_mb"] / processes_mb,
            "ratio_median": multi["peak_mb"] / processes_mb,
            "ratio_min": multi["peak_mb"] / processes_mb,
            "saving_vs_n_processes": 1 - multi["peak_mb"] / processes_mb,
            "peak_mb_one_adapter_all_rows": same_rows["peak_mb"],
            "extra_mb_vs_one_adapter_all_rows": multi["peak_mb"] - same_rows["peak_mb"],
            "expected_extra_mb": (n - 1) * 4 * multi["adapter_mb"],
        })


if __name__ == "__main__":
    main()
