"""BENCH.md ratio 6, `memory_model_error`: |predicted − measured| / measured step memory over a sweep of mixed
steps, for the scheduler's memory model fitted as MultiJobTrainer fits it when max_memory is set
(`MemoryModel.fit_by_profiling`: five shapes of the first job, one of two jobs of its kind, three per further kind).

With `--kinds lora mixlora dynmole` the jobs are of several kinds (BENCH.md's LoRA, MixLoRA and DynMoLE, two jobs
of each), and the row also gives the error of a model fitted on the first job's five shapes alone (every token at
its rate, its constant once: how the trainer profiled before the per-kind model).

With `--compile` the model is `compile_mixed_steps`'d (as MultiJobTrainer with torch_compile=True) and the sweep
measures compiled steps; the row also gives the error of the model profiled on eager steps, before compiling (how
the trainer profiled before 2026-12-05).

With `--packed` the sweep's steps are padding-free (TRL's `padding_free=True`): each job's rows concatenated, and
all jobs in one packed row, position ids restarting at every sequence; the prediction is the scheduler's for such a
step (`memory.predict([tokens], [{job: its tokens}])`), from the model profiled on packed steps, as the trainer fits
it for padding-free training; the row also gives the error of the model profiled on padded steps (how the trainer
profiled before 2026-12-05, third session).

DynMoLE jobs are profiled as the trainer profiles them, at their costliest selection (`memory.costliest_selection`:
the costlier of the most pairs that still dispatch and every pair); the row also gives the error of the model
profiled at the routers as they are (how the trainer profiled before 2026-12-05, fourth session). With
`--router-scale S` the sweep runs with every DynMoLE router scaled by S, as training sharpens them; the row then
gives, for both profiles, the largest under-prediction (measured above predicted), which a budget must not have.

Measured: peak CUDA memory on a GPU; on CPU (no allocator statistics) the bytes autograd saves for backward in
the forward (peft_mole.multijob.memory.activation_bytes), the part of step memory that depends on the batch.
Usage: python bench/memory_model_error.py [--shape small] [--jobs 4] [--kinds lora mixlora dynmole]
       [--compile [--compile-backend inductor]] [--packed] [--router-scale 10]
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
from common import (
    base_model,
    device,
    dynmole_config,
    emit,
    lora_config,
    mixlora_config,
    positive_int,
    setup_threads,
)

from peft_mole.multijob import MultiJobModel
from peft_mole.multijob.batching import profile_inputs
from peft_mole.multijob.memory import MemoryModel, adapter_memory_kind, costliest_selection, step_memory

LENGTHS = {"tiny": [16, 24, 32, 48], "small": [64, 128, 200, 256], "medium": [128, 256, 384, 512]}
CONFIGS = {"lora": lora_config, "mixlora": mixlora_config,
           "dynmole": dynmole_config}


def sweep(jobs: list[str], lengths: list[int], steps: int = 12, seed: int = 0) -> list[tuple[list[str], int]]:
    """Mixed steps as the trainer builds them: 2–6 of the jobs, 1–3 rows each, rows of a job consecutive, every
    row padded to the step's length."""
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        chosen = rng.sample(jobs, rng.randint(min(2, len(jobs)), min(6, len(jobs))))
        out.append(([job for job in chosen for _ in range(rng.randint(1, 3))], rng.choice(lengths)))
    return out


def packed_shape(row_jobs: list[str], length: int) -> tuple[list[int], list[dict[str, int]]]:
    """The rows of `row_jobs`, each `length` tokens, as the scheduler sees them packed: one row, {job: tokens}."""
    tokens = {job: length * row_jobs.count(job) for job in dict.fromkeys(row_jobs)}
    return [length * len(row_jobs)], [tokens]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--jobs", type=positive_int, default=4, help="jobs when every job is LoRA (--kinds lora)")
    parser.add_argument("--kinds", nargs="+", default=["lora"], choices=sorted(CONFIGS))
    parser.add_argument("--compile", action="store_true", help="compiled mixed steps (see the module docstring)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--packed", action="store_true", help="padding-free steps (see the module docstring)")
    parser.add_argument("--router-scale", type=float, default=1.0, help="DynMoLE routers ×S in the sweep")
    args = parser.parse_args()
    setup_threads()
    torch.manual_seed(0)
    per_kind = args.jobs if args.kinds == ["lora"] else 2
    configs = {f"{kind}{i}": CONFIGS[kind]() for kind in args.kinds for i in range(per_kind)}
    model = MultiJobModel(base_model(args.shape), configs)
    model.train()
    params = {name: [p for n, p in model.named_parameters() if p.requires_grad and f".{name}." in n + "."]
              for name in configs}
    vocab, longest = model.model.config.vocab_size, max(LENGTHS[args.shape])

    def step_fn(packed: bool):
        """A step on (rows, length) ids, row i through job row_jobs[i]: padded rows, or (packed) one packed row in
        the model's job order, as the trainer profiles padding-free training (`batching.profile_inputs`)."""
        def run(ids: torch.Tensor, row_jobs: list[str]) -> None:
            out = model(**profile_inputs(ids, row_jobs, packed, job_order=list(configs)), use_cache=False)
            torch.autograd.grad(out.loss, [p for job in dict.fromkeys(row_jobs) for p in params[job]],
                                allow_unused=True)
        return run

    run_step, run_packed = step_fn(False), step_fn(True)
    step = run_packed if args.packed else run_step
    kinds = {name: adapter_memory_kind(config) for name, config in configs.items()}
    eager_memory = None
    if args.compile:
        eager_memory = MemoryModel()
        eager_memory.fit_by_profiling(step, device(), vocab, longest, kinds,
                                      packed=args.packed)
        model.compile_mixed_steps(backend=args.compile_backend)
    padded_memory = None  # --packed: also the model profiled on padded steps
    if args.packed:
        padded_memory = MemoryModel()
        padded_memory.fit_by_profiling(run_step, device(), vocab, longest, kinds)
    dynmole_jobs = [name for name in configs if name.startswith("dynmole")]
    init_memory = None  # DynMoLE: also the model profiled at the routers as they are
    if dynmole_jobs:
        init_memory = MemoryModel()
        init_memory.fit_by_profiling(step, device(), vocab, longest, kinds, packed=args.packed)
    memory = MemoryModel()
    varying = {job: model.expert_settings(job) for job in dynmole_jobs}
    with costliest_selection(step, device(), varying, vocab, longest, kinds):
        memory.fit_by_profiling(step, device(), vocab, longest, kinds, packed=args.packed)
    with torch.no_grad():  # routers as training sharpens them
        for job in dynmole_jobs:
            for n, p in model.named_parameters():
                if f"_router.{job}." in n:
                    p.mul_(args.router_scale)
    one_job = MemoryModel()  # the first job's five shapes alone
    for tokens, squares, value in memory.samples[:5]:
        (count,) = tokens.values()
        one_job.observe([round(squares / count)] * round(count**2 / squares), value)
    errors, one_job_errors, eager_errors, padded_errors, init_errors = [], [], [], [], []
    under, init_under = [], []  # (measured − predicted) / measured
    for row_jobs, length in sweep(list(configs), LENGTHS[args.shape]):
        ids = torch.randint(3, vocab, (len(row_jobs), length), device=device())
        measured = step_memory(device(), lambda ids=ids, row_jobs=row_jobs: step(ids, row_jobs))
        lengths, jobs = packed_shape(row_jobs, length) if args.packed else ([length] * len(row_jobs), row_jobs)
        predicted = memory.predict(lengths, jobs)
        errors.append(abs(predicted - measured) / measured)
        under.append((measured - predicted) / measured)
        if init_memory is not None:
            init_predicted = init_memory.predict(lengths, jobs)
            init_errors.append(abs(init_predicted - measured) / measured)
            init_under.append((measured - init_predicted) / measured)
        one_job_errors.append(abs(one_job.predict(lengths) - measured) / measured)
        if eager_memory is not None:
            eager_errors.append(abs(eager_memory.predict(lengths, jobs) - measured) / measured)
        if padded_memory is not None:
            padded_errors.append(abs(padded_memory.predict(lengths, jobs) - measured) / measured)
        emit({"name": "memory_model_point", "shape": args.shape, "jobs": row_jobs, "length": length,
              "measured_mb": measured / 2**20, "predicted_mb": predicted / 2**20, "error": errors[-1],
              "one_job_error": one_job_errors[-1]})
    emit({
        "name": "memory_model_error", "shape": args.shape, "jobs": len(configs), "kinds": "+".join(args.kinds),
        "shapes": len(errors), "profiled": len(memory.samples), "device": str(device()),
        "measure": "cuda_peak" if device().type == "cuda" else "saved_activation_bytes",
        "ratio_median": statistics.median(errors), "ratio_min": min(errors), "error_max": max(errors),
        "error_mean": statistics.mean(errors), "one_job_error_median": statistics.median(one_job_errors),
        "one_job_error_max": max(one_job_errors), "beta": [float(b) for b in memory.beta],
        **({"packed": True, "padded_profile_error_median": statistics.median(padded_errors),
            "padded_profile_error_max": max(padded_errors)} if args.packed else {}),
        **({"router_scale": args.router_scale, "under_predicted_max": max(under),
            "init_profile_error_median": statistics.median(init_errors), "init_profile_error_max": max(init_errors),
            "init_profile_under_predicted_max": max(init_under)} if init_errors else {}),
        **({"compile": args.compile_backend, "eager_profile_error_median": statistics.median(eager_errors),
            "eager_profile_error_max": max(eager_errors)} if args.compile else {}),
    })


if __name__ == "__main__":
    main()
