"""BENCH.md ratio 3, `mole_vs_reference`: our MixLoRA train-step time / the reference implementation's, same shape.

The references need torch < 2.6 and transformers < 5, so they run in their own virtualenv (`make bench-peers`
builds it; `--peers-python` points at its interpreter): MoE-PEFT 2.0.2 (`bench/peers/moe_peft_step.py`) and the
`mixlora` package 0.2.3 (`bench/peers/mixlora_package_step.py`). The runs alternate, ours in this process and each
reference in a subprocess, `--rounds` times, each round timing `--repeats` steps after 3 warm-up steps; medians
are over all rounds. Two ratios per reference:
    ratio        = our MixLoRA step / its MixLoRA step                       (raw; different torch/transformers)
    ratio_vs_lora = (our MixLoRA / PEFT LoRA here) / (its MixLoRA / its LoRA step there)
the second divides out each environment's own LoRA step, i.e. what MixLoRA costs on top of LoRA.
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
# the attention each reference's step runs (ours: SDPA); `ratio_vs_lora` cancels it, `ratio_median` does not
REFERENCE_ATTENTION = {"moe_peft": "eager (moe_peft's attn_impl)",
                       "mixlora_package": "LlamaForCausalLM(config)'s default in transformers 4.46"}


def run_reference(python: str, script: str, repeats: int) -> dict[str, dict]:
    result = subprocess.run([python, str(HERE / script), "--repeats", str(repeats)], capture_output=True, text=True,
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
    lora = get_peft_model(base_model("small"), lora_config())
    mixlora = get_peft_model(base_model("small"), mixlora_config())
    batch = random_batch("small", lora.config.vocab_size)
    steps = {"peft_lora": train_step_fn(lora, batch), "mixlora": train_step_fn(mixlora, batch)}
    # each round's median, weighted by its steps, as the reference's rows give theirs (until 2026-12-07 ours were
    # the median of every step's time, theirs the median of round medians), and each round's minimum
    ours: dict[str, list[float]] = {"peft_lora": [], "mixlora": []}
    ours_min: dict[str, list[float]] = {"peft_lora": [], "mixlora": []}
    theirs: dict[str, dict[str, list[float]]] = {name: {"mix": [], "lora": [], "mix_min": []} for name in REFERENCES}
    versions: dict[str, dict] = {}
    for _ in range(args.rounds):
        for impl, secs in time_interleaved(steps, repeats=args.repeats).items():
            ours[impl] += [statistics.median(secs)] * args.repeats
            ours_min[impl].append(min(secs))
        for name, (script, mix_impl, lora_impl) in REFERENCES.items():
            rows = run_reference(args.peers_python, script, args.repeats)
            theirs[name]["mix"] += [rows[mix_impl]["median_s"]] * args.repeats
            theirs[name]["lora"] += [rows[lora_impl]["median_s"]] * args.repeats
            theirs[name]["mix_min"].append(rows[mix_impl]["min_s"])
            versions[name] = {k: v for k, v in rows[mix_impl].items() if k in ("torch", "transformers", "mixlora",
                                                                                  "moe_peft", "peft")}
    our_mix, our_lora = statistics.median(ours["mixlora"]), statistics.median(ours["peft_lora"])
    for name, secs in theirs.items():
        their_mix, their_lora = statistics.median(secs["mix"]), statistics.median(secs["lora"])
        emit({"name": "mole_vs_reference", "reference": name, "shape": "small", "rounds": args.rounds,
              "ratio_median": our_mix / their_mix, "ratio_min": min(ours_min["mixlora"]) / min(secs["mix_min"]),
              "ratio_vs_lora": (our_mix / our_lora) / (their_mix / their_lora),
              "ours_mixlora_s": our_mix, "ours_lora_s": our_lora, "reference_mixlora_s": their_mix,
              "reference_lora_s": their_lora, "reference_versions": versions[name], "device": "cpu",
              "reference_attention": REFERENCE_ATTENTION[name]})


if __name__ == "__main__":
    main()
