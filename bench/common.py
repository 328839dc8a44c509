"""Shared pieces of the benchmarks: BENCH.md shapes, training steps, timing and JSON output."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from peft_mole import synthetic

BATCH = {"tiny": (2, 32), "small": (4, 256), "medium": (8, 512)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(dropout: float = 0.05):
    """BENCH.md's LoRA: r 16, alpha 32 on q,k,v,o,gate,up,down."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS)


def mixlora_config(dropout: float = 0.05, use_dora: bool = False):
    """BENCH.md's MixLoRA: 8 experts, top-2, r 16, alpha 32; expert LoRA on gate/up/down, attention LoRA q,k,v,o.
    With `use_dora`, DoRA experts (MixDoRA)."""
    import peft_mole

    return peft_mole.MixLoRAConfig(num_experts=8, top_k=2, r=16, lora_alpha=32, lora_dropout=dropout,
                                   use_dora=use_dora)


def dynmole_config(dropout: float = 0.05):
    """BENCH.md's DynMoLE: 8 experts, r 16, alpha 32 (q 1.1, top_p 0.75, threshold 0.9, min 2: its defaults)."""
    import peft_mole

    return peft_mole.DynMoLEConfig(num_experts=8, r=16, lora_alpha=32, lora_dropout=dropout)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (counts of steps, repeats, jobs, tokens)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def probability(text: str) -> float:
    """argparse type: a float in [0, 1) (a dropout rate)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def step_parser(repeats: int = 10) -> argparse.ArgumentParser:
    """The options every step-time benchmark takes: --shape (BENCH.md shapes) and --repeats (timed steps)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=list(BATCH))
    parser.add_argument("--repeats", type=positive_int, default=repeats)
    return parser


def setup_threads() -> None:
    """CPU threads: this machine's 2 cores (BENCH.md's CPU figures), or BENCH_THREADS where it is set (the test
    suite's smoke run sets 1: its two workers share the cores, and a third thread slowed the other worker's tests
    five-fold). Each CPU ratio row records the count (`provenance`); the README's table takes 2-thread rows only."""
    if not torch.cuda.is_available():
        threads = os.environ.get("BENCH_THREADS", "2")
        if not threads.isdigit() or int(threads) < 1:
            raise ValueError(f"BENCH_THREADS must be a positive whole number of threads, got {threads!r}")
        torch.set_num_threads(int(threads))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def base_model(shape: str, seed: int = 0):
    """The shape's random Llama: fp32 on CPU; on CUDA initialised there (seconds, not a minute of CPU init for the
    medium shape) and cast to bf16."""
    if device().type != "cuda":
        return synthetic.random_model("llama", shape, seed=seed)
    with torch.device(device()):
        return synthetic.random_model("llama", shape, seed=seed).to(torch.bfloat16)


def random_batch(shape: str, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    batch, seq = BATCH[shape]
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device())
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


OPTIMS = ("adamw_torch", "adamw_torch_fused")  # TrainingArguments' names: torch's default AdamW, and the fused one
# (TrainingArguments' default since torch 2.8, which MultiJobTrainer's jobs get too)


def adamw(params, optim: str = "adamw_torch") -> torch.optim.AdamW:
    """torch's AdamW(lr 1e-4), fused where `optim` is `adamw_torch_fused` (as that `TrainingArguments.optim` makes it):
    every tensor in one fused kernel; else torch's default implementation (foreach on CUDA, a per-tensor loop on the
    CPU)."""
    if optim not in OPTIMS:
        raise ValueError(f"optim must be one of {OPTIMS}, got {optim!r}")
    return torch.optim.AdamW(params, lr=1e-4, fused=optim == "adamw_torch_fused")


def train_step_fn(model, batch: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None = None,
                  optim: str = "adamw_torch") -> Callable[[], None]:
    """One step = forward + backward + AdamW step (BENCH.md); forward and loss under autocast when a dtype is given."""
    model.train()
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], optim)

    def step() -> None:
        with torch.autocast(device().type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = model(**batch, use_cache=False).loss  # as Trainer and TRL train (no cache)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def synchronize() -> None:
    """Wait for the GPU's queued kernels (a no-op on the CPU): CUDA runs them asynchronously, so a timer read right
    after a step would time their launch."""
    if device().type == "cuda":
        torch.cuda.synchronize()


class Timings(list):
    """One step function's timed seconds, and on CUDA `step_peak_mb`: the most its timed steps allocated above what
    was allocated before each (activations, gradients, temporaries: the step's own, whatever else the process
    holds, such as other impls' models and optimizer states)."""

    step_peak_mb: float | None = None


def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int = 3, repeats: int = 10) -> dict[str, Timings]:
    """Run the step functions in turn so machine noise hits all of them alike, each round in the other order than
    the last (A, B, C; C, B, A; ...), so no step is always the one that runs after another's allocations (since
    2026-12-07: an 8192-token packed step timed 1.07× another in the order A, B and 0.98× in the order B, A)."""
    times: dict[str, Timings] = {name: Timings() for name in steps}
    cuda = device().type == "cuda"
    for i in range(warmup + repeats):
        for name, step in (reversed(steps.items()) if i % 2 else steps.items()):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            step()
            synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
                if cuda:
                    above = (torch.cuda.max_memory_allocated() - before) / 2**20
                    times[name].step_peak_mb = max(times[name].step_peak_mb or 0.0, above)
    return times


def peak_memory_mb() -> float:
    """The process's peak so far: CUDA allocator peak (since the last reset), or peak RSS on CPU."""
    if device().type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def record(name: str, shape: str, impl: str, seconds: list[float], tokens: int, **extra) -> dict:
    """One measurement's row. Its memory: `step_peak_mem_mb`, on CUDA the most this impl's timed steps allocated
    above what was allocated before each (`Timings`), or on CPU `process_peak_rss_mb`, the whole process's peak
    RSS (one process times several impls, and RSS has no reset: not a figure of this impl). Before 2026-12-06 both
    were `peak_mem_mb`, the process's peak, the same for every impl of a run."""
    peak = getattr(seconds, "step_peak_mb", None)
    memory = {"step_peak_mem_mb": round(peak, 1)} if peak is not None else {
        "process_peak_rss_mb" if device().type == "cpu" else "process_peak_mem_mb": round(peak_memory_mb(), 1)}
    row = {
        "name": name, "shape": shape, "impl": impl, "device": str(device()), "machine": platform.node(),
        "median_s": statistics.median(seconds), "min_s": min(seconds), "steps": len(seconds),
        "tokens_per_s": tokens / statistics.median(seconds), **memory, "torch": torch.__version__, **extra,
    }
    emit(row)
    return row


def code_commit() -> str:
    """The git commit of the code ("-dirty" with uncommitted changes to peft_mole/ or bench/, or new files there;
    "unknown" outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "peft_mole", "bench",
                                ":(exclude)bench/results"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()  # the code measured (not the results file, docs, tests)
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return commit


CODE_COMMIT = code_commit()  # read once, when the script starts: a commit made while it runs is not the code it runs


def cpu_features() -> dict:
    """The CPU's vector level as torch reads it and its low-precision matrix instructions (the VM's CPU model changed
    between sessions: fp16 autocast cost 30× the fp32 step on one without AVX512-FP16, 1.0× on one with it)."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    wanted = ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_int8")
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_flags": [flag for flag in wanted if flag in flags]}


def provenance() -> dict:
    """What produced a result row: the command line, the commit of the code the script started with (`CODE_COMMIT`;
    before 2026-12-06 read at each row, so rows of one run could name a commit made during it) and the UTC time,
    so the README's table can show each row's command and commit; on the CPU, the threads it ran with and the CPU's
    features (`cpu_features`, since 2026-12-08)."""
    root = Path(__file__).resolve().parent.parent
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(root) if script.is_relative_to(root) else script
    argv = " ".join(["python", str(shown), *(shlex.quote(a) for a in sys.argv[1:])])
    return {"argv": argv, "commit": CODE_COMMIT, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({} if torch.cuda.is_available() else {"threads": torch.get_num_threads(), **cpu_features()})}


def emit(row: dict) -> None:
    """Print one result row as a JSON line, with its `provenance` (summary rows of a ratio: those with
    "ratio_median")."""
    if "ratio_median" in row:
        row = {**row, **provenance()}
    print(json.dumps(row), flush=True)
    sys.stdout.flush()
