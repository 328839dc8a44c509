"""Render the README's benchmark tables from bench/results/*.jsonl (no hand-copied numbers).

Usage: python bench/render_table.py [results.jsonl ...]   (default: the newest step-time file and the newest
learning-check file)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

COMMANDS = {
    "mixlora_vs_lora": "python bench/mixlora_vs_lora.py --shape {shape} --dropout {dropout}",
    "dynmole_vs_mixlora": "python bench/dynmole_vs_mixlora.py --shape {shape}",
    "dynmole_fused_chain": "python bench/dynmole_vs_mixlora.py --shape {shape}",
    "fused_chain": "python bench/fused_chain.py --shape {shape} --tokens {tokens}",
    "generate_vs_base": "python bench/generate_vs_base.py --shape {shape}",
    "generate_compiled_vs_base": "python bench/generate_vs_base.py --shape {shape} --compile",
    "multijob_speedup": ("python bench/multijob_speedup.py --shape {shape} --jobs {jobs} --dropout {dropout}"
                         "{optim_flag}{compile_flag}{kind_flag}{packed_flag}{attention_flag}"),
    "multijob_vs_sfttrainer": ("python bench/multijob_vs_sfttrainer.py --shape {shape} --jobs {jobs} "
                               "--steps {steps} --kind {kind}"),
    "multijob_memory": "python bench/multijob_memory.py --shape {shape} --jobs {jobs}",
    "memory_model_error": "python bench/memory_model_error.py --shape {shape}{kinds_flag}",
    "pad_fraction": "python bench/pad_fraction.py --shape {shape} --jobs {jobs}",
    "eval_throughput": "python bench/eval_throughput.py --shape {shape} --adapters {adapters}",
    "compile_step": "python bench/compile_step.py --shape {shape} --impls {impl}{checkpointing_flag}",
    "compiled_shapes": "python bench/compiled_shapes.py --shape {shape} --jobs {jobs} --cases {case}{kind_flag}"
                       "{packed_flag}",
    "grouped_products": "python bench/grouped_products.py",
    "gpu_busy": "python bench/profile_step.py --shape {shape} --impls {impl}",
    "host_time": "python bench/host_time.py --jobs {jobs} --dropout {dropout}",
    "job_optimizer": "python bench/job_optimizer.py --shapes {shape}{clip_flag}",
    "mole_vs_reference": "python bench/mole_vs_reference.py --peers-python PEERS/bin/python",
    "options_step": "python bench/options_step.py --shape {shape} --options {impl}",
    "saved_activations": "python bench/saved_activations.py --shape {shape}",
    "packed_attention": "python bench/packed_attention.py --shape {shape} --cases {case}{compile_flag}",
    "packed_row_mask": "python bench/packed_attention.py --shape {shape} --cases long_row",
}
DESCRIPTIONS = {
    "mixlora_vs_lora": "MixLoRA step / PEFT LoRA step (fwd+bwd+AdamW), dropout {dropout}{autocast_note}",
    "dynmole_vs_mixlora": "DynMoLE step / MixLoRA top-2 step, routers {router_state}{experts_note}{autocast_note}",
    "dynmole_fused_chain": "DynMoLE step with the fused chain (option, `PEFT_MOLE_FUSED_CHAIN=on`) / the default "
                           "DynMoLE step, routers {router_state}; {vs_mixlora_median:.2f}× MixLoRA{compile_note}",
    "fused_chain": "one layer's dense chain alone ({experts} experts, {tokens} tokens, I = {width}), fwd+bwd, fused "
                   "block kernels / eager ({fused_ms:.0f} vs {eager_ms:.0f} ms)",
    "generate_vs_base": "{impl} greedy-generation tokens/s / base model tokens/s, KV cache (higher is better)",
    "generate_compiled_vs_base": "{impl} greedy generation with a static cache and torch.compile ({mode}) / the "
                                 "base model compiled alike (higher is better); {speedup_vs_eager:.2f}× its eager "
                                 "tokens/s (base {base_speedup_vs_eager:.2f}×), compile {compile_s:.0f} s",
    "multijob_speedup": "{jobs} {kind_label} jobs (dropout {dropout}{optim_note}) in mixed steps{packed_note} vs one after another with "
                        "PEFT (higher is better); base-only limit S({jobs}){limit_note} = {limit_median:.2f}, reached "
                        "{fraction_of_limit:.0%}{compiled_steps_note}",
    "multijob_vs_sfttrainer": "{jobs} {kind_label} jobs (dropout {dropout}{trainer_checkpointing_note}) in one "
                              "`MultiJobTrainer` vs one "
                              "`SFTTrainer` each, one after another, steady-state tokens/s (higher is better; "
                              "minima column: the lowest of {repeats} repeats); whole `train()` calls "
                              "{train_ratio:.2f}× ({steps} steps per job)",
    "multijob_memory": "peak memory of {jobs} jobs in one process / {jobs} single-job processes{shared_note}; "
                       "{extra_mb_vs_one_adapter_all_rows:+.0f} MB vs one adapter on the same rows; "
                       "{ratio_vs_base_plus_adapters:.2f}× one base process + {jobs} × adapter state",
    "memory_model_error": "memory model relative error (predicted vs measured), {shapes} unseen {kinds_note}"
                          "({measure}); max {error_max:.1%}{one_job_note}",
    "pad_fraction": "padding / all tokens in mixed batches, {jobs} jobs, log-normal lengths; one step per round "
                    "{one_step_per_round:.0%}, length grouping {length_grouping:.0%} (LoRA micro-batches kept whole: "
                    "{length_grouping_whole_micro_batches:.0%}; cutting them into rows gives "
                    "{cut_rows_speedup:.2f}× the real tokens/s), + group_by_length sampler {ratio_median:.1%} (the value "
                    "columns; the jobs' own micro-batches: "
                    "{micro_batch_pad_fraction:.1%}); padding_free=True {padding_free:.0%} at "
                    "{padding_free_speedup:.2f}× length grouping's real tokens/s (SDPA, packed steps)"
                    "{sdpa_packed_note}",
    "eval_throughput": "adapters evaluated per minute, {adapters} in one pass / one at a time ({questions} questions; "
                       "{adapters_per_min_one_pass:.0f} vs {adapters_per_min_one_at_a_time:.0f} per minute)",
}
DESCRIPTIONS["compiled_shapes"] = (
    "{jobs} {kind_label} jobs' compiled mixed steps{packed_note}, {case} shapes: the first 6 steps (their compiles "
    "included) with {sizes_label} dynamic from the first graph / with Dynamo's rule "
    "({dynamic_steps[first_steps_s]:.0f} vs {dynamo_rule[first_steps_s]:.0f} s, {dynamic_steps[graphs]} vs "
    "{dynamo_rule[graphs]} graphs); the steps after them {step_ratio_median:.2f}×")
DESCRIPTIONS["gpu_busy"] = ("{impl} step: GPU busy time / wall time ({kernels_per_step} kernels, "
                            "{kernel_ms_per_step:.0f} of {wall_ms_per_step:.0f} ms; higher is better)")
DESCRIPTIONS["saved_activations"] = ("{impl}: activations saved for the backward (one training forward) / PEFT "
                                      "LoRA's ({saved_mb:.0f} vs {lora_saved_mb:.0f} MB)")
DESCRIPTIONS["grouped_products"] = ("row-segment products (experts, LoRA jobs), `torch._grouped_mm` / a loop of "
                                     "F.linear, fwd+bwd, {dtype}: {cases} cases from {lowest:.2f}× to {highest:.2f}×, "
                                     "max difference {max_abs_difference:.0e}")
DESCRIPTIONS["host_time"] = ("host time of one projection (fwd+bwd, tiny shape), {jobs} LoRA jobs stacked / PEFT LoRA "
                              "on one job's row; one after another would be {jobs}×")
DESCRIPTIONS["job_optimizer"] = ("one job's optimizer step ({clip_note}fused AdamW, {tensors} LoRA tensors), over one "
                                  "flat tensor / over its tensors ({flat_us:.0f} vs {per_tensor_us:.0f} µs)")
DESCRIPTIONS["compile_step"] = ("{impl} step{checkpointing_note}, torch.compile / eager, dropout {dropout} "
                                 "(compile {compile_s:.0f} s, {graph_breaks} graph breaks)")
DESCRIPTIONS["options_step"] = ("MixLoRA step / PEFT LoRA step with {impl}; vs plain fp32 eager: MixLoRA "
                                 "{mixlora_vs_eager:.2f}×, LoRA {lora_vs_eager:.2f}×")
DESCRIPTIONS["mole_vs_reference"] = (
    "our MixLoRA step / {reference}'s ({reference_versions[torch]} there{attention_note}); MixLoRA-over-LoRA cost vs "
    "theirs {ratio_vs_lora:.2f}×")
DESCRIPTIONS["packed_attention"] = (
    "PEFT LoRA step on one packed row ({case} lengths: {sequences} sequences, {tokens} tokens, the longest {longest}), "
    "attention `sdpa_packed`{chunk_note} / `sdpa` ({packed_ms:.0f} vs {masked_ms:.0f} ms){operator_note}; the same "
    "sequences "
    "as padded rows ({padded_tokens} tokens) {padded_vs_packed:.2f}× the packed step's time")
DESCRIPTIONS["packed_row_mask"] = (
    "PEFT LoRA step on one packed row of {sequences} sequences ({tokens} tokens), attention `sdpa_packed`: without "
    "the row's (T × T) mask ({row_mask_mb:.0f} MB), the chunks making their blocks / with transformers' row mask "
    "({lean_ms:.0f} vs {row_mask_ms:.0f} ms)")
PERCENT = {"memory_model_error", "pad_fraction", "gpu_busy"}
KIND_LABELS = {"lora": "LoRA", "mixlora": "MixLoRA", "dynmole": "DynMoLE"}  # the benches' --kind/--kinds values


def _chunks(row: dict) -> str:
    """`sdpa_packed`'s chunk size in a row's label: rows record it since 2026-12-06 (`chunk_tokens`); before, and
    until 646b08c (2026-12-07), the operator's chunks were 128 tokens (`packed_attention.CHUNK_TOKENS`)."""
    if row.get("attention", "sdpa_packed") != "sdpa_packed" and row["name"] != "pad_fraction":
        return ""
    return f" (chunks of {row.get('chunk_tokens', 128)} tokens)"


def _value(name: str, value: float) -> str:
    return f"{value:.1%}" if name in PERCENT else f"{value:.2f}×"


_IDENTITY = ("name", "shape", "impl", "jobs", "rows_per_job", "dropout", "reference", "router_state", "adapters",
             "questions", "new_tokens", "case", "autocast", "optim", "script", "compile", "clip", "kind", "kinds",
             "packed", "router_scale", "gradient_checkpointing", "attention")


def latest_rows(rows: list[dict]) -> list[dict]:
    """The last row of each measurement (same name and settings): a re-run in the same file supersedes; a
    "skipped" row is dropped once the measurement it stands for exists."""
    # compile_step rows from before it measured several impls (no "impl") are superseded by the per-impl rows
    rows = [row for row in rows if not (row["name"] == "compile_step" and "impl" not in row)]
    # compiled by another backend than inductor (aot_eager: the test suite's smoke runs): not a measured figure
    rows = [row for row in rows if str(row.get("compile") or "inductor").split()[0] == "inductor"]
    # run with other than the machine's 2 CPU threads (BENCH_THREADS; the smoke runs: 1): not the measured figure
    rows = [row for row in rows if row.get("threads", 2) == 2]
    # variants run one after the other in one process (compiled_shapes --in-process: the smoke runs): no figure
    rows = [row for row in rows if not row.get("in_process")]
    # dynmole_fused_chain rows with sharp routers date from before the script timed the option at init only
    rows = [row for row in rows if not (row["name"] == "dynmole_fused_chain" and row.get("router_state") == "sharp")]
    # memory_model_error rows from before the per-kind model (no "kinds") are superseded by the rows with kinds
    if any(row["name"] == "memory_model_error" and "kinds" in row for row in rows):
        rows = [row for row in rows if not (row["name"] == "memory_model_error" and "kinds" not in row)]
    # compiled_shapes rows from before each variant ran in a process of its own (no "rounds"; the second variant
    # in one process stepped 12-15 % slower) are superseded by the rows with rounds
    if any(row["name"] == "compiled_shapes" and "rounds" in row for row in rows):
        rows = [row for row in rows if not (row["name"] == "compiled_shapes" and "rounds" not in row)]
    # mole_vs_reference rows from before ours ran each reference's attention (no "attention": ours SDPA against
    # MoE-PEFT's eager attention) are superseded by the rows with it
    if any(row["name"] == "mole_vs_reference" and "attention" in row for row in rows):
        rows = [row for row in rows if not (row["name"] == "mole_vs_reference" and "attention" not in row)]
    defaults = {"router_scale": 1.0}  # rows from before a setting existed measured at its default
    latest = {tuple(str(row.get(k, defaults.get(k))) for k in _IDENTITY): row for row in rows}
    measured = {row["name"] for row in latest.values()}
    return [row for row in latest.values()
            if not (row["name"].endswith("_skipped") and row["name"].removesuffix("_skipped") in measured)]


def _kinds_note(row: dict) -> str:
    """memory_model_error: what its sweep's steps held."""
    if "kinds" not in row:
        return "shapes "
    labels = [KIND_LABELS[k] for k in row["kinds"].split("+")]
    steps = "packed (padding-free) mixed steps" if row.get("packed") else "mixed steps"
    if len(labels) == 1:
        return f"{steps} of {row['jobs']} {labels[0]} jobs "
    return f"{steps} of {row['jobs']} jobs ({', '.join(labels)}, {row['jobs'] // len(labels)} of each) "


GPU_RUN_PARTS = {  # ratio -> the part of bench/gpu_run.sh that measures it (its flags: the repeats a GPU call allows)
    "gpu_busy": "profile", "generate_vs_base": "generate", "generate_compiled_vs_base": "compiled_generate",
    "fused_chain": "fused_chain", "dynmole_fused_chain": "fused_chain", "dynmole_vs_mixlora": "fused_chain",
    "compile_step": "compiled_train", "job_optimizer": "job_optimizer", "grouped_products": "grouped",
    "memory_model_error": "memory_model",
}


def _gpu_run_part(row: dict) -> str | None:
    """The `bench/gpu_run.sh` part that printed a GPU row (rows from before scripts recorded their command line)."""
    if row.get("script") == "gpu_medium":
        return "medium_autocast" if row.get("autocast") == "bf16" else "medium"
    if row["name"] == "multijob_speedup":
        if row.get("packed"):
            return "multijob_packed"
        if "compiled_vs_eager" in row:
            return "multijob_compiled"
        return "multijob_fused" if row.get("optim") == "adamw_torch_fused" else "multijob"
    return GPU_RUN_PARTS.get(row["name"])


def _command(row: dict) -> str:
    """The command that printed the row: its own script's where another script measured the ratio
    (bench/gpu_medium.py: the GPU step ratios). A GPU row without a recorded command came from `bench/gpu_run.sh`,
    whose part holds the flags it ran with (the repeats a GPU call allows; before 2026-12-06 the table showed the
    script with its default flags, which would time other repeats and impls)."""
    if "argv" in row:  # recorded by the script itself (since 2026-12-05): every flag it ran with
        return row["argv"]
    part = _gpu_run_part(row) if row.get("_file_device") == "cuda" else None
    if part == "fused_chain" and row["name"] != "fused_chain" and row.get("router_state") != "flat":
        # the part's DynMoLE run before it flattened the routers (2026-12-07): the initialised ones, 3 repeats
        return f"python bench/dynmole_vs_mixlora.py --shape {row['shape']} --repeats 3"
    if part is not None:
        return f"bash bench/gpu_run.sh {part}"
    if "script" not in row:
        return COMMANDS[row["name"]].format(**row)
    return f"python bench/{row['script']}.py --shape {row['shape']}" + (
        " --autocast bf16" if row.get("autocast") == "bf16" else "")


def ratio_table(path: Path, rows: list[dict]) -> None:
    rows = latest_rows([{"dropout": 0.05, **r} if r["name"] == "multijob_speedup" else r for r in rows])
    rows = [{**r, "ratio_median": r["gpu_busy_fraction"], "ratio_min": r["gpu_busy_fraction"]}
            if r["name"] == "gpu_busy" else r for r in rows]
    device = next((r["device"] for r in rows if "device" in r), "?")
    rows = [{**r, "_file_device": device} for r in rows]
    torch_version = next((r["torch"] for r in rows if "torch" in r), "?")
    print(f"Source: `{_shown(path)}` (device: {device}, torch {torch_version})\n")
    print("| ratio | shape | value (medians) | value (minima) | command | commit |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        checkpointed = row.get("case") == "gradient_checkpointing"
        row = {**row, "checkpointing_flag": " --gradient-checkpointing" if checkpointed else "",
               "checkpointing_note": " with gradient checkpointing" if checkpointed else "",
               "compile_note": f", first-step compile {row['compile_s']:.0f} s" if "compile_s" in row else "",
               "optim_note": ", fused AdamW" if row.get("optim") == "adamw_torch_fused" else "",
               # (mole_vs_reference rows before 2026-12-08 ran ours with SDPA whatever the reference ran)
               "attention_note": f", both with {row['attention']} attention" if "attention" in row
               else "; ours SDPA, MoE-PEFT eager" if row.get("reference") == "moe_peft" else "",
               "optim_flag": f" --optim {row['optim']}" if "optim" in row else "",
               "compiled_steps_note": (f"; compiled steps, {row['compiled_vs_eager']:.2f}× the eager mixed step's "
                                       f"time, compile {row['compile_s']:.0f} s" if "compiled_vs_eager" in row else "")
                                      + (f"; flat job optimizers {row['flat_vs_per_tensor']:.2f}× the per-tensor step"
                                         if "flat_vs_per_tensor" in row else ""),
               "compile_flag": (" --compile" + "".join(f" --compile-mode {mode}" for mode in
                                                       str(row.get("compile", "")).split()[1:])
                                if "compiled_vs_eager" in row else "") + (
                                   " --compare-layouts" if "flat_vs_per_tensor" in row else ""),
               "clip_flag": "" if row.get("clip", True) else " --no-clip",
               "kind_label": KIND_LABELS[row.get("kind", "lora")],
               "kind_flag": f" --kind {row['kind']}" if "kind" in row else "",
               "packed_flag": " --packed" if row.get("packed") else "",
               "packed_note": (" of one packed row (padding-free)" if row.get("packed") else "")
                              + (f", attention `{row['attention']}`{_chunks(row)}" if "attention" in row else ""),
               "chunk_note": _chunks(row),
               "limit_note": (" of the base on padded rows with SDPA" if row.get("packed") and
                              not row.get("limit_packed") else ""),
               "sdpa_packed_note": (f"; attention `sdpa_packed`{_chunks(row)} (one packed step per round) "
                                    f"{row['padding_free_sdpa_packed_speedup']:.2f}×"
                                    if "padding_free_sdpa_packed_speedup" in row else ""),
               "attention_flag": f" --attention {row['attention']}" if "attention" in row else "",
               "operator_note": (f"; in the operator that keeps SDPA's softmax statistics, "
                                 f"{row['operator_vs_autograd']:.2f}× the step with its chunks under autograd"
                                 if "operator_vs_autograd" in row else "")
                              + (f"; compiled ({row['compile']}, first step {row['compile_s']:.0f} s) "
                                 f"{row['compiled_vs_eager']:.2f}× the eager step"
                                 if row["name"] == "packed_attention" and "compiled_vs_eager" in row else "")
                              + (f", its operator keeping the statistics {row['compiled_kept_vs_recompute']:.2f}× "
                                 f"recomputing the forward in the backward"
                                 if "compiled_kept_vs_recompute" in row else ""),
               "sizes_label": "the tokens" if row.get("packed") else "rows and length",
               "clip_note": "clipping + " if row.get("clip", True) else "",
               "kinds_flag": (f" --jobs {row['jobs']}" if row.get("kinds") == "lora" else
                              " --kinds " + row["kinds"].replace("+", " ") if "kinds" in row else "")
                             + (" --compile" if "eager_profile_error_median" in row else "")
                             + (" --packed" if row["name"] == "memory_model_error" and row.get("packed") else "")
                             + (f" --router-scale {row['router_scale']:g}" if row.get("router_scale", 1.0) != 1.0
                                else ""),
               "kinds_note": _kinds_note(row),
               "shared_note": (f" (their {row['shared_file_mb']:.0f} MB of shared library pages counted once)"
                               if "shared_file_mb" in row else " (sum of their peak RSS)"),
               "one_job_note": (f"; profiling the first job alone: median {row['one_job_error_median']:.1%}, max "
                                f"{row['one_job_error_max']:.1%}" if "one_job_error_median" in row else "")
                               + (f"; compiled steps ({row['compile']}), the model profiled on eager steps: median "
                                  f"{row['eager_profile_error_median']:.1%}, max {row['eager_profile_error_max']:.1%}"
                                  if "eager_profile_error_median" in row else "")
                               + (f"; the model profiled on padded steps: median "
                                  f"{row['padded_profile_error_median']:.1%}, max {row['padded_profile_error_max']:.1%}"
                                  if "padded_profile_error_median" in row else "")
                               + (f"; DynMoLE routers ×{row['router_scale']:g} in the sweep, profiled under the "
                                  f"costliest selection: under-predicted by at most "
                                  f"{max(row['under_predicted_max'], 0):.1%}; "
                                  f"profiled as they are: median {row['init_profile_error_median']:.1%}, "
                                  f"under-predicted by at most {max(row['init_profile_under_predicted_max'], 0):.1%}"
                                  if "init_profile_error_median" in row else ""),
               "autocast_note": ", bf16 autocast" if row.get("autocast") == "bf16" else "",
               "trainer_checkpointing_note": (", gradient checkpointing" if row.get("gradient_checkpointing", True)
                                              else ", no gradient checkpointing"),
               "experts_note": (f" ({row['dynmole_experts_per_token']:.2f} experts/token)"
                                if "dynmole_experts_per_token" in row else "")}
        if row["name"] == "mole_vs_reference_skipped":
            print(f"| `mole_vs_reference`: not measured — {row['reason']} | | | | | {row.get('commit', '—')} |")
        if row["name"] in COMMANDS and "ratio_median" not in row:  # the script recorded a failure
            reason = str(row.get("error", "no ratio recorded")).splitlines()[0]
            print(f"| `{row['name']}`: failed — {reason} | {row['shape']} | | | `{_command(row)}` "
                  f"| {row.get('commit', '—')} |")
        elif row["name"] in COMMANDS:
            description = DESCRIPTIONS[row["name"]].format(**row)
            command = _command(row)
            print(f"| `{row['name']}`: {description} | {row['shape']} | {_value(row['name'], row['ratio_median'])} "
                  f"| {_value(row['name'], row['ratio_min'])} | `{command}` | {row.get('commit', '—')} |")


def learning_table(path: Path, rows: list[dict]) -> None:
    """One row per method and learning rate: the latest run's (before 2026-12-06 every run's, under one command
    without its steps and seeds)."""
    print(f"Source: `{_shown(path)}`\n")
    print("| method | lr | trainable params | eval loss (mean ± std) | accuracy (mean ± std) | command |")
    print("|---|---|---|---|---|---|")
    latest = {(row["method"], row["learning_rate"]): row for row in rows if row["name"] == "learning_check_summary"}
    for row in latest.values():
        seeds = row.get("seed_list", list(range(row["seeds"])))  # (rows before the list: seeds 0, 1, ..., as run)
        command = (f"python bench/learning_check.py --learning-rate {row['learning_rate']:g} --methods {row['method']}"
                   f" --steps {row['steps']} --seeds {' '.join(str(seed) for seed in seeds)}")
        print(f"| {row['method']} | {row['learning_rate']:g} | {row['trainable_params']:,} "
              f"| {row['eval_loss_mean']:.3f} ± {row['eval_loss_std']:.3f} "
              f"| {row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} | `{command}` |")


def _shown(path: Path) -> str:
    """A results file as the table's source line names it: from the repository root where it lies inside."""
    root = Path(__file__).resolve().parent.parent
    resolved = path.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


DATED = re.compile(r"^(?P<prefix>.+)-(?P<date>\d{4}-\d{2}-\d{2})\.jsonl$")  # (host names may hold "-")
NOT_STEP_TIMES = ("peers", "soak", "learning_check")  # other files the bench folder holds


def newest_results(folder: Path) -> list[Path]:
    """The step-time file `<machine>-<date>.jsonl` of the latest date in its name (file times say nothing in a
    fresh clone), and the latest `learning_check-<date>.jsonl`; peers' and soak files are never the default."""
    dated = [(m["date"], m["prefix"], p) for p in folder.glob("*.jsonl") if (m := DATED.match(p.name))]
    steps = [(date, p.name, p) for date, prefix, p in dated if not prefix.startswith(NOT_STEP_TIMES)]
    learning = [(date, p.name, p) for date, prefix, p in dated if prefix.startswith("learning_check")]
    if not steps:
        raise SystemExit(f"no <machine>-<date>.jsonl results file in {folder}")
    return [max(steps)[2]] + ([max(learning)[2]] if learning else [])


def read_rows(path: Path) -> list[dict]:
    """The JSON objects of a results file; other lines (a script's stray output that `tee -a` kept) are skipped
    with a note on stderr."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and "name" in row:
            rows.append(row)
        else:
            print(f"{path}:{number}: not a result line, skipped: {line[:80]!r}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path,
                        help="results .jsonl files (default: the newest step-time and learning-check files)")
    results = Path(__file__).parent / "results"
    paths = parser.parse_args().files
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no such results file: {', '.join(missing)}")
    if not paths:
        paths = newest_results(results)
    for path in paths:
        rows = read_rows(path)
        if any(r["name"] == "learning_check_summary" for r in rows):
            learning_table(path, rows)
        else:
            ratio_table(path, rows)
        print()


if __name__ == "__main__":
    main()
