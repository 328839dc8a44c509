"""Compiled multi-job steps: rows and length dynamic from the first graph, or Dynamo's rule (issue 6, part 5).

`MultiJobModel.compile_mixed_steps()` leaves the shapes to Dynamo: the first graph is static, and the first change of
the rows and the length compiles a second one with those sizes dynamic. With `dynamic=True` (`dynamic_steps`; what
MultiJobTrainer takes where its jobs' first micro-batches differ in width, or with `accelerate launch
--dynamo_use_dynamic true`) the first graph has them dynamic (with eagerly run blocks, every size). This
times both on the same steps, N LoRA jobs (BENCH.md's LoRA, dropout 0.05; `--kind mixlora`: its MixLoRA, 8 experts,
top-2; `--kind dynmole`: its DynMoLE, whose blocks run eagerly, the rest of each layer compiled), forward + backward:
- "varying": six steps of other rows and lengths, as length-grouped mixed batches come (the first-steps time holds
  the compiles), then the timed steps at the shape's batch;
- "fixed": six steps of the shape's batch (data of one length), then the same timed steps.
`--packed`: each step's rows as one packed row, as MultiJobTrainer makes it from TRL's padding-free micro-batches
(`batching.packed_mixed_batch`: one job per token, each job's tokens contiguous, position ids restarting per row,
the sequences' bounds), so the step's token count is the size that varies.
Each variant runs in a fresh child process, in the order rule, dynamic, dynamic, rule, ... over `--rounds`: run
after another model in one process, the timed steps of the second variant were 12-15 % slower whichever it was
(MixLoRA jobs on `small`, 2026-12-07), which the first version of this script, one process and the rule first,
took for the dynamic graph's cost. Rows: `compiled_shapes`, per case: the first six steps' time with
`dynamic=True` / with Dynamo's rule (lower is better; the median of the rounds, and the ratio of their minima), and
the timed steps' ratio alike (over all rounds' timed steps). Inductor's caches are off (compile time from scratch).
Usage: python bench/compiled_shapes.py [--shape small] [--jobs 4] [--kind lora] [--repeats 8] [--rounds 2]
       [--cases varying fixed] [--compile-backend inductor] [--packed] [--in-process]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch._inductor.config
from common import (
    BATCH,
    base_model,
    device,
    dynmole_config,
    emit,
    lora_config,
    mixlora_config,
    positive_int,
    setup_threads,
    step_parser,
    synchronize,
)
from torch._dynamo.utils import counters

from peft_mole.multijob import MultiJobModel
from peft_mole.multijob.batching import packed_mixed_batch

FIRST_STEPS = 6


def shapes(shape: str, case: str) -> list[tuple[int, int]]:
    """The first steps' (rows, length): the shape's batch, or sizes around it (never 1, which Dynamo specialises)."""
    rows, seq = BATCH[shape]
    if case == "fixed":
        return [(rows, seq)] * FIRST_STEPS
    return [(rows, seq), (max(rows - 1, 2), seq * 3 // 4), (rows, seq * 7 // 8), (max(rows // 2, 2), seq * 5 // 8),
            (rows, seq), (max(rows - 1, 2), seq * 13 // 16)]


def run(shape: str, jobs: int, kind: str, case: str, dynamic: bool, backend: str, repeats: int,
        packed: bool = False) -> dict:
    torch._dynamo.reset()
    counters.clear()
    config = {"lora": lora_config, "mixlora": mixlora_config, "dynmole": dynmole_config}[kind]
    model = MultiJobModel(base_model(shape), {f"job{i}": config() for i in range(jobs)}).train()
    model.compile_mixed_steps(backend=backend, **({"dynamic": True} if dynamic else {}))
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.model.config.vocab_size

    def step(rows: int, seq: int, seed: int) -> None:
        ids = torch.randint(3, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed)).to(device())
        if packed:  # the trainer's packed step: each job's rows one after another, in the model's job order
            positions = torch.arange(seq, device=ids.device)[None]
            parts = {}
            for job in range(jobs):
                mine = ids[job::jobs].reshape(1, -1)  # rows job, job + jobs, ... (as the padded step's names)
                if mine.numel():
                    parts[f"job{job}"] = {"input_ids": mine, "labels": mine,
                                          "position_ids": positions.repeat(1, mine.shape[1] // seq)}
            batch = packed_mixed_batch(parts)
            ids = batch.input_ids
            logits = model(**batch.model_inputs(), use_cache=False).logits
        else:
            names = [f"job{i % jobs}" for i in range(rows)]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                           use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        torch.autograd.grad(loss, params, allow_unused=True)  # (eager blocks: jobs absent from a step's rows)
        synchronize()

    start = time.perf_counter()
    for seed, (rows, seq) in enumerate(shapes(shape, case)):
        step(rows, seq, seed)
    first = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"]
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        step(*BATCH[shape], 100 + seed)
        times.append(time.perf_counter() - start)
    return {"first_steps_s": first, "graphs": graphs, "step_s": times,
            "graphs_while_timed": counters["stats"]["unique_graphs"] - graphs}


def in_child(args, case: str, variant: str) -> dict:
    """`run` in a fresh process (no model, compiled code or allocator state of an earlier run); with `--in-process`
    in this one, after `torch._dynamo.reset()`."""
    if args.in_process:
        return run(args.shape, args.jobs, args.kind, case, variant == "dynamic", args.compile_backend, args.repeats,
                   args.packed)
    command = [sys.executable, __file__, "--child", variant, "--cases", case, "--shape", args.shape, "--jobs",
               str(args.jobs), "--kind", args.kind, "--repeats", str(args.repeats), "--compile-backend",
               args.compile_backend, *(["--packed"] if args.packed else [])]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout  # stderr shown
    return json.loads(out.strip().splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    """One variant's rounds: the first steps' median and minimum, the timed steps' (all rounds') likewise."""
    firsts, steps = [r["first_steps_s"] for r in runs], [t for r in runs for t in r["step_s"]]
    return {"first_steps_s": statistics.median(firsts), "first_steps_min_s": min(firsts),
            "graphs": max(r["graphs"] for r in runs), "step_median_s": statistics.median(steps),
            "step_min_s": min(steps), "graphs_while_timed": max(r["graphs_while_timed"] for r in runs),
            "rounds_first_steps_s": firsts, "rounds_step_median_s": [statistics.median(r["step_s"]) for r in runs]}


def main() -> None:
    parser = step_parser(repeats=8)
    parser.add_argument("--jobs", type=positive_int, default=4)
    parser.add_argument("--kind", choices=["lora", "mixlora", "dynmole"], default="lora", help="every job's adapter")
    parser.add_argument("--cases", nargs="+", choices=["varying", "fixed"], default=["varying", "fixed"])
    parser.add_argument("--rounds", type=positive_int, default=2,
                        help="child processes per variant, in the order rule, dynamic, dynamic, rule, ... (an even "
                             "number balances the order)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (aot_eager: Dynamo's graphs and AOTAutograd, no code generated)")
    parser.add_argument("--packed", action="store_true",
                        help="each step's rows as one packed row (TRL's padding_free=True): its tokens vary")
    parser.add_argument("--in-process", action="store_true",
                        help="run the variants in this process (the test suite's smoke run: no second import of "
                             "torch; the timings then carry the earlier variant's state, so they are no figure)")
    parser.add_argument("--child", choices=["rule", "dynamic"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        setup_threads()
        torch._inductor.config.force_disable_caches = True  # compile time from scratch, not an earlier run's cache
        settings = (args.shape, args.jobs, args.kind, args.cases[0], args.child == "dynamic", args.compile_backend)
        print(json.dumps(run(*settings, args.repeats, args.packed)))
        return
    if args.in_process:
        setup_threads()
        torch._inductor.config.force_disable_caches = True
    for case in args.cases:
        runs = {"rule": [], "dynamic": []}
        for round_ in range(args.rounds):
            for variant in ("rule", "dynamic") if round_ % 2 == 0 else ("dynamic", "rule"):
                runs[variant].append(in_child(args, case, variant))
        rule, dynamic = summary(runs["rule"]), summary(runs["dynamic"])
        emit({"name": "compiled_shapes", "shape": args.shape, "jobs": args.jobs, "kind": args.kind, "case": case,
              "rounds": args.rounds,
              **({"compile": args.compile_backend} if args.compile_backend != "inductor" else {}),
              **({"packed": True} if args.packed else {}), **({"in_process": True} if args.in_process else {}),
              "dynamo_rule": rule, "dynamic_steps": dynamic,
              "ratio_median": dynamic["first_steps_s"] / rule["first_steps_s"],
              "ratio_min": dynamic["first_steps_min_s"] / rule["first_steps_min_s"],
              "step_ratio_median": dynamic["step_median_s"] / rule["step_median_s"],
              "step_ratio_min": dynamic["step_min_s"] / rule["step_min_s"]})


if __name__ == "__main__":
    main()
