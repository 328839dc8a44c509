"""BENCH.md ratio 3, `mole_vs_reference`: our MixLoRA train-step time / the reference implementation's, same shape.

The references need torch < 2.6 and transformers < 5, so they run in their own virtualenv (`make bench-peers`
builds it; `--peers-python` points at its interpreter): MoE-PEFT 2.0.2 (`bench/peers/moe_peft_step.py`) and the
`mixlora` package 0.2.3 (`bench/peers/mixlora_package_step.py`). The runs alternate, ours in this process and each
reference in a subprocess, `--rounds` times, each round timing `--repeats` steps after 3 warm-up steps; medians
are over all rounds, on `BENCH_THREADS` threads (2) on both sides. Ours runs with the attention each reference runs
(MoE-PEFT's only CPU attention is its eager one; the `mixlora` package's model takes SDPA), so that the ratio is of
the MoE layers and their framework, not of the attention kernels. Two ratios per reference:
    ratio        = our MixLoRA step / its MixLoRA step                       (raw; different torch/transformers)
    ratio_vs_lora = (our MixLoRA / PEFT LoRA here) / (its MixLoRA / its LoRA step there)
the second divides out each environment's own LoRA step, i.e. what MixLoRA costs on top of LoRA. Before
2026-12-08 ours always ran SDPA, so the MoE-PEFT ratio held SDPA against its eager attention.
Without a peers interpreter one JSON line says why nothing was measured.
Usage: python bench/mole_vs_reference.py [--peers-python build/peers-venv/bin/python] [--rounds 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

import common
import torch
from common import (
    base_model,
    device,
    emit,
    lora_config,
    mixlora_config,
    random_batch,
    setup_threads,
    time_interleaved,
    train_step_fn,
)
from peft import get_peft_model

HERE = Path(__file__).resolve().parent
REFERENCES = {  # name: (script, its MixLoRA impl, its LoRA impl)
    "moe_peft": ("peers/moe_peft_step.py", "moe_peft_mixlora", "moe_peft_lora"),
    "mixlora_package": ("peers/mixlora_package_step.py", "mixlora_package", "peft_lora"),
}
# the attention each reference's step runs (its rows say so; checked), which ours then runs too
REFERENCE_ATTENTION = {"moe_peft": "eager", "mixlora_package": "sdpa"}


def run_reference(python: str, script: str, repeats: int) -> dict[str, dict]:
    result = subprocess.run([python, str(HERE / script), "--repeats", str(repeats), "--threads",
                             str(torch.get_num_threads())], capture_output=True, text=True,
                            timeout=1800, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed: {result.stderr[-1500:]}")
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {row["impl"]: row for row in rows if row["name"] == "train_step"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers-python", default="build/peers-venv/bin/python")
    parser.add_argument("--rounds", type=common.positive_int, default=2)
    parser.add_argument("--repeats", type=common.positive_int, default=5)
    args = parser.parse_args()
    if not os.access(args.peers_python, os.X_OK):
        emit({"name": "mole_vs_reference_skipped", "reason": f"no peers interpreter at {args.peers_python} "
              "(make bench-peers builds it: moe-peft==2.0.2, mixlora==0.2.3, peft==0.13.2)"})
        return
    if device().type != "cpu":  # the references run on the CPU (their virtualenv's torch): ours must too
        emit({"name": "mole_vs_reference_skipped", "reason": "the references run on the CPU only; run this "
              "script on a machine without CUDA (a ratio of GPU to CPU times means nothing)"})
        return
    setup_threads()
    steps = {}
    for attention in sorted(set(REFERENCE_ATTENTION.values())):
        for impl, config in (("peft_lora", lora_config()), ("mixlora", mixlora_config())):
            base = base_model("small")
            base.set_attn_implementation(attention)
            model = get_peft_model(base, config)
            steps[f"{impl}_{attention}"] = train_step_fn(model, random_batch("small", model.config.vocab_size))
    # each round's median, weighted by its steps, as the reference's rows give theirs (until 2026-12-07 ours were
    # the median of every step's time, theirs the median of round medians), and each round's minimum
    ours: dict[str, list[float]] = {impl: [] for impl in steps}
    ours_min: dict[str, list[float]] = {impl: [] for impl in steps}
    theirs: dict[str, dict[str, list[float]]] = {name: {"mix": [], "lora": [], "mix_min": []} for name in REFERENCES}
    versions: dict[str, dict] = {}
    threads = torch.get_num_threads()
    for _ in range(args.rounds):
        for impl, secs in time_interleaved(steps, repeats=args.repeats).items():
            ours[impl] += [statistics.median(secs)] * args.repeats
            ours_min[impl].append(min(secs))
        for name, (script, mix_impl, lora_impl) in REFERENCES.items():
            rows = run_reference(args.peers_python, script, args.repeats)
            for impl in (mix_impl, lora_impl):
                if rows[impl].get("attention") != REFERENCE_ATTENTION[name] or rows[impl]["threads"] != threads:
                    raise RuntimeError(f"{script}'s {impl} ran {rows[impl].get('attention')} attention on "
                                       f"{rows[impl].get('threads')} threads; ours would run "
                                       f"{REFERENCE_ATTENTION[name]} on {threads}")
            theirs[name]["mix"] += [rows[mix_impl]["median_s"]] * args.repeats
            theirs[name]["lora"] += [rows[lora_impl]["median_s"]] * args.repeats
            theirs[name]["mix_min"].append(rows[mix_impl]["min_s"])
            versions[name] = {k: v for k, v in rows[mix_impl].items() if k in ("torch", "transformers", "mixlora",
                                                                                  "moe_peft", "peft")}
    for name, secs in theirs.items():
        attention = REFERENCE_ATTENTION[name]
        our_mix, our_lora = (statistics.median(ours[f"{impl}_{attention}"]) for impl in ("mixlora", "peft_lora"))
        their_mix, their_lora = statistics.median(secs["mix"]), statistics.median(secs["lora"])
        emit({"name": "mole_vs_reference", "reference": name, "shape": "small", "rounds": args.rounds,
              "ratio_median": our_mix / their_mix,
              "ratio_min": min(ours_min[f"mixlora_{attention}"]) / min(secs["mix_min"]),
              "ratio_vs_lora": (our_mix / our_lora) / (their_mix / their_lora),
              "ours_mixlora_s": our_mix, "ours_lora_s": our_lora, "reference_mixlora_s": their_mix,
              "reference_lora_s": their_lora, "reference_versions": versions[name], "device": "cpu",
              "attention": attention, "threads": threads})


if __name__ == "__main__":
    main()
