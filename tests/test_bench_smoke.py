"""The benchmark scripts run on the `tiny` shape and print rows the README table renders (timings are not checked:
they belong to `make bench`). A script that breaks, such as a compiled step failing on a new operator, is found
here instead of in the next `make bench`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_in_one_process

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "mixlora_vs_lora": ["--shape", "tiny", "--repeats", "1"],
    "dynmole_vs_mixlora": ["--shape", "tiny", "--repeats", "1", "--init-router-scale", "0"],  # flat: every expert
    "fused_chain": ["--shape", "tiny", "--tokens", "800", "--repeats", "1"],  # two full blocks: the kernels run
    "multijob_speedup": ["--shape", "tiny", "--repeats", "1", "--jobs", "2", "--optim", "adamw_torch_fused", "--compile",
                         "--compile-backend", "aot_eager", "--compare-layouts"],  # the graphs, not inductor's kernels
    "multijob_vs_sfttrainer": ["--shape", "tiny", "--jobs", "2", "--steps", "4", "--warmup", "2", "--repeats", "1"],
    "saved_activations": ["--shape", "tiny"],
    "options_step": ["--shape", "tiny", "--repeats", "1", "--options", "checkpointing", "bf16_autocast", "fp16_autocast"],
    "generate_vs_base": ["--shape", "tiny", "--repeats", "1", "--new-tokens", "4", "--compile", "--compile-backend",
                         "aot_eager"],  # inductor's decoding: tests/tuners/test_compiled_decoding.py
    "pad_fraction": ["--shape", "tiny", "--jobs", "2", "--steps", "2"],
    "grouped_products": ["--repeats", "1"],
    "packed_attention": ["--shape", "tiny", "--repeats", "1", "--chunk-tokens", "16", "--compile", "--compile-backend",
                         "aot_eager", "--cases", "equal", "long_tailed", "long_row"],
    "host_time": ["--jobs", "2", "--repeats", "2"],
    "job_optimizer": ["--shapes", "tiny", "--repeats", "2"],
    # Dynamo's graphs and breaks, as inductor gets them (inductor's code: test_compiled_training.py's SFT run)
    "compile_step": ["--shape", "tiny", "--repeats", "1", "--impls", "mixlora", "--compile-backend", "aot_eager"],
    "compiled_shapes": ["--shape", "tiny", "--repeats", "1", "--jobs", "2", "--cases", "varying", "--rounds", "1",
                        "--compile-backend", "aot_eager", "--in-process"],  # (a child process: the imports again)
    # packed steps: the packed and the padded profile both run; DynMoLE profiled at its costliest and as it is
    "memory_model_error": ["--shape", "tiny", "--kinds", "lora", "mixlora", "dynmole", "--packed",
                           "--router-scale", "10"],
}
FRACTIONS = {"pad_fraction", "memory_model_error"}
# other runs the tests below check: {key: (script, its arguments)}
OTHER_RUNS = {
    "profile_step": ("profile_step", ["--shape", "tiny", "--steps", "1"]),
    "launch_count": ("launch_count", ["--shape", "small"]),
    "multijob_speedup_packed": ("multijob_speedup", ["--shape", "tiny", "--repeats", "1", "--jobs", "2", "--packed",
                                                     "--attention", "sdpa_packed"]),
    # one variant's child run in this process (its own fresh process would take the imports' 5 s again)
    "compiled_shapes_packed": ("compiled_shapes", ["--child", "dynamic", "--packed", "--shape", "tiny", "--repeats",
                                                   "1", "--jobs", "2", "--cases", "varying", "--compile-backend",
                                                   "aot_eager"]),
}
RUNS = {**{name: (name, args) for name, args in SCRIPTS.items()}, **OTHER_RUNS}


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    """{run (`RUNS`): the JSON rows it printed} ([{"name": "error", ...}] for a script that failed)."""
    # the scripts in one process (`run_in_one_process`: the imports once instead of 18 times); one torch thread, as
    # each test worker has (BENCH_THREADS: else 2, beside the other worker's on 2 cores)
    runs = run_in_one_process({key: (False, f"bench/{name}.py", args, str(ROOT)) for key, (name, args) in RUNS.items()},
                              cwd=ROOT, env={**os.environ, "BENCH_THREADS": "1"})
    return {name: [{"name": "error", "traceback": run["error"]}] if run["error"] else
            [json.loads(line) for line in run["stdout"].splitlines() if line.startswith("{")]
            for name, run in runs.items()}


def ran(rows: dict[str, list[dict]], key: str) -> list[dict]:
    """The rows run `key` printed; its traceback where it failed."""
    assert rows[key][0].get("name") != "error", rows[key][0]["traceback"]
    return rows[key]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_bench_script_prints_its_ratio(rows, name):
    ratios = [row for row in ran(rows, name) if row["name"] == name]
    assert ratios, f"{name} printed no `{name}` row: {rows[name]}"
    for row in ratios:
        assert math.isfinite(row["ratio_median"]) and math.isfinite(row["ratio_min"])
        if name in FRACTIONS:  # a share of tokens or a relative error: 0 is possible (all padding grouped away)
            assert 0 <= row["ratio_min"] <= row["ratio_median"] <= 1
        else:
            assert row["ratio_median"] > 0


def test_generate_bench_compares_compiled_decoding(rows):
    """--compile: each adapter's compiled generation against the compiled base, with its compile time."""
    compiled = {row["impl"]: row for row in rows["generate_vs_base"] if row["name"] == "generate_compiled_vs_base"}
    assert set(compiled) == {"peft_lora", "mixlora", "dynmole", "mixdora"}
    for row in compiled.values():
        assert row["ratio_median"] > 0 and row["speedup_vs_eager"] > 0 and math.isfinite(row["compile_s"])
        assert row["compile"] == "aot_eager" and row["threads"] == 1  # (the table leaves such rows out)


def test_dynmole_bench_scales_the_first_routers_and_gives_the_sharp_ones_from_the_initialised(rows):
    """--init-router-scale 0: flat routers send every token to all 8 experts (the dense path, which the fused chain
    serves), and the fused chain is timed in that state (on `tiny` no block is full, so its row names the error);
    the sharp state scales the initialised routers, not the flattened ones."""
    states = {row["router_state"]: row for row in rows["dynmole_vs_mixlora"] if row["name"] == "dynmole_vs_mixlora"}
    assert set(states) == {"flat", "sharp"}
    assert states["flat"]["dynmole_experts_per_token"] == 8.0 and states["flat"]["router_scale"] == 0.0
    assert states["sharp"]["router_scale"] == 4.0 and states["sharp"]["dynmole_experts_per_token"] < 8.0
    (fused,) = [row for row in rows["dynmole_vs_mixlora"] if row["name"] == "dynmole_fused_chain"]
    assert fused["router_state"] == "flat" and ("ratio_median" in fused or "8.00 experts/token" in fused["error"])


def test_compile_bench_steps_mixlora_compiled_without_graph_breaks(rows):
    (row,) = [row for row in rows["compile_step"] if row["name"] == "compile_step"]
    assert row["impl"] == "mixlora" and row["graph_breaks"] == 0 and row["graphs"] >= 1


def test_compiled_shapes_bench_times_one_dynamic_graph_against_dynamos_two(rows):
    """Steps of varying shape: `dynamic=True` compiles one graph, Dynamo's rule a static one and then a dynamic one;
    the timed steps (the shape's batch) compile nothing more."""
    (row,) = [row for row in ran(rows, "compiled_shapes") if row["name"] == "compiled_shapes"]
    assert (row["case"], row["dynamic_steps"]["graphs"], row["dynamo_rule"]["graphs"]) == ("varying", 1, 2)
    assert row["dynamic_steps"]["graphs_while_timed"] == row["dynamo_rule"]["graphs_while_timed"] == 0


def test_compiled_shapes_bench_takes_packed_steps_of_varying_tokens_in_one_dynamic_graph(rows):
    """--packed: each step's rows as one packed row, whose token count varies; with `dynamic=True` one graph serves
    the six steps and the timed ones."""
    (child,) = ran(rows, "compiled_shapes_packed")
    assert (child["graphs"], child["graphs_while_timed"]) == (1, 0) and len(child["step_s"]) == 1


def test_multijob_bench_compiles_one_graph_for_every_mix(rows):
    """--compile: the compiled mixed step against the eager one; other mixes of jobs and rows add one graph at most
    (rows and length turn dynamic)."""
    (row,) = [row for row in rows["multijob_speedup"] if row["name"] == "multijob_speedup"]
    assert row["compile"] == "aot_eager" and row["compiled_vs_eager"] > 0 and row["graphs"] <= 2
    steps = {r["impl"] for r in rows["multijob_speedup"] if r["name"] == "multijob_step"}
    assert {"mixed_all_jobs_per_tensor", "mixed_all_jobs_compiled_per_tensor"} <= steps  # --compare-layouts
    assert row["flat_vs_per_tensor"] > 0
    # the compile time is the first step's less a compiled step's (before 2026-12-08 it held the step's own time)
    (step,) = [r["median_s"] for r in rows["multijob_speedup"] if r.get("impl") == "mixed_all_jobs_compiled"]
    assert 0 < row["compile_s"] == row["first_step_s"] - step


def _render(rows: list[dict], path: Path) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = subprocess.run([sys.executable, str(ROOT / "bench" / "render_table.py"), str(path)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert table.returncode == 0, table.stderr[-3000:]
    return table.stdout


def test_render_table_renders_every_ratio(rows, tmp_path):
    """Every script's ratio as `make bench` measures it (compiled by inductor, on 2 threads; the smoke runs compile
    with aot_eager on 1 thread, and rows run so are no figure: the table leaves them out)."""
    smoke = [row for name in SCRIPTS for row in rows[name]]
    assert any(str(row.get("compile")).startswith("aot_eager") for row in smoke if row["name"] == "compile_step")
    as_measured = [{**row, "compile": "inductor"} if str(row.get("compile")).startswith("aot_eager") else row
                   for row in smoke]
    as_measured = [{**row, "threads": 2} if "threads" in row else row for row in as_measured]
    as_measured = [{k: v for k, v in row.items() if k != "in_process"} for row in as_measured]
    table = _render(as_measured, tmp_path / "vm-smoke.jsonl")
    for name in [*SCRIPTS, "generate_compiled_vs_base", "packed_row_mask"]:
        assert f"| `{name}`:" in table, name
    assert "| `compile_step`:" not in _render(smoke, tmp_path / "vm-aot-eager.jsonl")
    assert any(row.get("in_process") for row in smoke)
    in_process = [{**row, "compile": "inductor", "threads": 2} if row.get("in_process") else row for row in smoke]
    assert "| `compiled_shapes`:" not in _render(in_process, tmp_path / "vm-in-process.jsonl")
    one_thread = [{**row, "compile": "inductor"} if "compile" in row else row for row in smoke]
    assert "| `mixlora_vs_lora`:" not in _render(one_thread, tmp_path / "vm-one-thread.jsonl")


def test_mole_vs_reference_rows_name_the_attention_and_supersede_those_that_did_not(tmp_path):
    """Until 2026-12-08 ours ran SDPA against MoE-PEFT's eager attention: such a row says so, and a row that ran
    ours on the reference's attention replaces it."""
    row = {"name": "mole_vs_reference", "reference": "moe_peft", "shape": "small", "ratio_median": 0.82,
           "ratio_min": 0.81, "ratio_vs_lora": 0.71, "reference_versions": {"torch": "2.5.1"}, "device": "cpu"}
    old = _render([row], tmp_path / "vm-old.jsonl")
    assert "(2.5.1 there; ours SDPA, MoE-PEFT eager)" in old and "| 0.82× | 0.81× |" in old
    new = _render([row, {**row, "attention": "eager", "ratio_median": 0.83}], tmp_path / "vm-new.jsonl")
    assert "(2.5.1 there, both with eager attention)" in new and "| 0.83× |" in new and "0.82×" not in new


def test_render_table_renders_gpu_rows(tmp_path):
    """The GPU run's rows (bench/gpu_run.sh): `gpu_busy` from the profile, step ratios that bench/gpu_medium.py
    measured (its own command, no experts-per-token field; under bf16 autocast), multi-job rows with fused AdamW."""
    rows = [
        {"name": "gpu_busy", "shape": "medium", "impl": "mixlora", "kernels_per_step": 17120,
         "kernel_ms_per_step": 249.0, "wall_ms_per_step": 625.0, "gpu_busy_fraction": 0.398},
        {"name": "dynmole_vs_mixlora", "script": "gpu_medium", "shape": "medium", "router_state": "init",
         "dropout": 0.05, "ratio_median": 1.47, "ratio_min": 1.43},
        {"name": "mixlora_vs_lora", "script": "gpu_medium", "shape": "medium", "router_state": "init",
         "dropout": 0.05, "autocast": "bf16", "ratio_median": 1.25, "ratio_min": 1.2},
        {"name": "multijob_speedup", "shape": "medium", "jobs": 4, "rows_per_job": 1, "dropout": 0.05,
         "optim": "adamw_torch_fused", "ratio_median": 3.5, "ratio_min": 3.2, "limit_median": 4.0, "limit_min": 3.9,
         "fraction_of_limit": 0.875},
        {"name": "multijob_speedup", "shape": "medium", "jobs": 8, "rows_per_job": 1, "dropout": 0.05,
         "optim": "adamw_torch_fused", "ratio_median": 7.0, "ratio_min": 6.0, "limit_median": 7.5, "limit_min": 7.0,
         "fraction_of_limit": 0.93, "compile": "inductor reduce-overhead", "compile_s": 120.0, "graphs": 2,
         "compiled_vs_eager": 0.5},
    ]
    table = _render(rows, tmp_path / "h200-smoke.jsonl")
    assert ("| `gpu_busy`: mixlora step: GPU busy time / wall time (17120 kernels, 249 of 625 ms; higher is better) "
            "| medium | 39.8% | 39.8% | `python bench/profile_step.py --shape medium --impls mixlora` |") in table
    assert ("| `dynmole_vs_mixlora`: DynMoLE step / MixLoRA top-2 step, routers init | medium | 1.47× | 1.43× "
            "| `python bench/gpu_medium.py --shape medium` |") in table
    assert ("| `mixlora_vs_lora`: MixLoRA step / PEFT LoRA step (fwd+bwd+AdamW), dropout 0.05, bf16 autocast | medium "
            "| 1.25× | 1.20× | `python bench/gpu_medium.py --shape medium --autocast bf16` |") in table
    assert ("4 LoRA jobs (dropout 0.05, fused AdamW) in mixed steps" in table
            and "`python bench/multijob_speedup.py --shape medium --jobs 4 --dropout 0.05 --optim adamw_torch_fused`"
            in table)
    assert ("reached 93%; compiled steps, 0.50× the eager mixed step's time, compile 120 s | medium | 7.00× | 6.00× | "
            "`python bench/multijob_speedup.py --shape medium --jobs 8 --dropout 0.05 --optim adamw_torch_fused --compile "
            "--compile-mode reduce-overhead` |") in table


def test_rows_name_the_commit_the_script_started_with_and_cpu_memory_as_the_process_peak(rows, monkeypatch):
    """A commit made while a script runs is not the code it measured: rows carry the commit read at its start
    (before, each row read git again, and two rows of one run named two commits). On CPU a row's memory is the
    process's peak RSS under that name (RSS has no reset between the impls one process times)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import common

    def no_git(*args, **kwargs):
        raise AssertionError("git read again after the script started")

    monkeypatch.setattr(common.subprocess, "run", no_git)
    assert common.provenance()["commit"] == common.CODE_COMMIT
    (lora,) = [row for row in rows["mixlora_vs_lora"] if row.get("impl") == "peft_lora"]
    assert lora["process_peak_rss_mb"] > 0 and "peak_mem_mb" not in lora


def test_gpu_rows_without_a_recorded_command_name_the_gpu_run_part_that_made_them(tmp_path):
    """Rows of a CUDA results file from before scripts recorded their command came from bench/gpu_run.sh, whose
    flags (fewer repeats, other impls) differ from the scripts' defaults: the table names its part (before, the
    script with its defaults, which times other repeats and impls)."""
    base = {"shape": "medium", "device": "cuda", "dropout": 0.05, "ratio_median": 1.5, "ratio_min": 1.4}
    rows = [
        {**base, "name": "mixlora_vs_lora", "script": "gpu_medium", "router_state": "init", "autocast": "bf16"},
        {**base, "name": "dynmole_vs_mixlora", "script": "gpu_medium", "router_state": "init"},
        {**base, "name": "generate_vs_base", "impl": "mixlora"},
        {**base, "name": "multijob_speedup", "jobs": 4, "optim": "adamw_torch_fused", "limit_median": 4.0,
         "fraction_of_limit": 0.9, "flat_vs_per_tensor": 0.8},
        {**base, "name": "multijob_speedup", "jobs": 8, "limit_median": 7.5, "fraction_of_limit": 0.9},
        # the fused_chain part timed the initialised routers until it flattened them (2026-12-07)
        {**base, "name": "dynmole_vs_mixlora", "router_state": "init"},
        {**base, "name": "dynmole_vs_mixlora", "router_state": "flat"},
    ]
    table = _render(rows, tmp_path / "h200-2026-12-04.jsonl")
    commands = [line.rsplit("`", 2)[1] for line in table.splitlines() if line.startswith("| `")]
    assert commands == ["bash bench/gpu_run.sh medium_autocast", "bash bench/gpu_run.sh medium",
                        "bash bench/gpu_run.sh generate", "bash bench/gpu_run.sh multijob_fused",
                        "bash bench/gpu_run.sh multijob",
                        "python bench/dynmole_vs_mixlora.py --shape medium --repeats 3",
                        "bash bench/gpu_run.sh fused_chain"], commands
    for part in ("medium_autocast", "medium", "generate", "multijob_fused", "multijob"):  # parts gpu_run.sh has
        assert f"\n        {part}) run " in (ROOT / "bench" / "gpu_run.sh").read_text(), part
    assert f"Source: `{tmp_path / 'h200-2026-12-04.jsonl'}`" in table  # (a file outside bench/results: its path)


def test_learning_table_shows_the_latest_run_of_each_method_with_its_steps_and_seeds(tmp_path):
    summary = {"name": "learning_check_summary", "method": "mixlora", "learning_rate": 0.003,
               "trainable_params": 10, "eval_loss_std": 0.0, "accuracy_mean": 0.5, "accuracy_std": 0.0}
    rows = [{**summary, "steps": 300, "seeds": 3, "eval_loss_mean": 3.0},
            {**summary, "steps": 20, "seeds": 1, "seed_list": [7], "eval_loss_mean": 5.0}]
    table = _render(rows, tmp_path / "learning_check-x-2026-12-07.jsonl")
    lines = [line for line in table.splitlines() if line.startswith("| mixlora")]
    assert len(lines) == 1 and "| 5.000 ± 0.000 |" in lines[0], table  # the latest run only (before: both)
    assert ("`python bench/learning_check.py --learning-rate 0.003 --methods mixlora --steps 20 --seeds 7`"
            in lines[0])
    table = _render(rows[:1], tmp_path / "learning_check-x-2026-12-08.jsonl")  # a row before the seed list
    assert "--steps 300 --seeds 0 1 2`" in table


def test_profile_step_breaks_each_step_down(rows):
    rows = {row["impl"]: row["ms_per_step"] for row in ran(rows, "profile_step") if row["name"] == "profile_step"}
    assert set(rows) == {"peft_lora", "mixlora", "multijob_4_lora"}
    for impl, ranges in rows.items():
        assert {"forward", "backward", "optimizer", "model::attention", "model::mlp"} <= set(ranges), impl
    assert "peft_mole::lora_deltas" in rows["multijob_4_lora"] and "peft_mole::route" in rows["mixlora"]


def test_launch_count_shows_gpu_blocks_launch_fewer_operators(rows):
    """On the small shape the CPU blocks of the expert chains are 190 pairs, the GPU's hold every pair of a layer:
    counted with the GPU's block sizes, MixLoRA and DynMoLE launch fewer operators per layer (still more than
    PEFT LoRA)."""
    rows = {(row["impl"], row["blocks"]): row["launches_per_layer"]
            for row in ran(rows, "launch_count") if row["name"] == "launch_count"}
    assert set(rows) == {("peft_lora", "cpu"), ("mixlora", "cpu"), ("dynmole_init", "cpu"), ("multijob_4_lora", "cpu"),
                         ("mixlora", "gpu"), ("dynmole_init", "gpu")}
    for impl in ("mixlora", "dynmole_init"):
        assert rows["peft_lora", "cpu"] < rows[impl, "gpu"] < rows[impl, "cpu"], impl


def test_multijob_bench_times_packed_mixed_steps(rows):
    """--packed: the mixed step takes the jobs' rows as one packed row (eager here; the compiled packed step is
    tests/multijob/test_compiled_packed_steps.py's), with the attention that keeps its sequences apart."""
    (row,) = [row for row in ran(rows, "multijob_speedup_packed") if row["name"] == "multijob_speedup"]
    assert row["packed"] is True and row["ratio_median"] > 0 and "compiled_vs_eager" not in row
    assert row["attention"] == "sdpa_packed"


def test_pad_fraction_bench_trains_padding_free_with_each_attention(rows):
    """Padding-free runs with `sdpa` (packed steps no longer than a round's longest micro-batch) and `sdpa_packed`
    (one packed step per round): the latter takes no more steps."""
    (row,) = [row for row in ran(rows, "pad_fraction") if row["name"] == "pad_fraction"]
    details = row["details"]
    assert details["padding_free_sdpa_packed"]["pad_fraction"] == details["padding_free"]["pad_fraction"] == 0.0
    assert details["padding_free_sdpa_packed"]["mixed_steps"] <= details["padding_free"]["mixed_steps"]
    assert row["padding_free_sdpa_packed_speedup"] > 0


def test_packed_attention_bench_times_both_attentions_and_padded_rows(rows):
    """Both cases: the packed row's sequences (all of the equal case's of one length; the long-tailed case's of
    several, with padding when laid out as rows) and the layouts timed: the masked row, `sdpa_packed` in its
    operator and without its statistics, eager and compiled, another chunk size, padded rows."""
    summary = {row["case"]: row for row in ran(rows, "packed_attention") if row["name"] == "packed_attention"}
    assert summary["equal"]["padded_tokens"] == summary["equal"]["tokens"] == 2 * 32
    assert summary["long_tailed"]["padded_tokens"] > summary["long_tailed"]["tokens"] >= 2 * 32
    steps = {(row["case"], row["impl"]) for row in rows["packed_attention"] if row["name"] == "packed_attention_step"}
    assert steps == {(case, impl) for case in ("equal", "long_tailed")
                     for impl in ("packed_sdpa_mask", "packed_sdpa_packed", "packed_sdpa_packed_c16", "padded_rows",
                                  "packed_sdpa_packed_autograd", "packed_sdpa_packed_compiled",
                                  "packed_sdpa_packed_compiled_recompute")} | {
        ("long_row", "packed_sdpa_packed"), ("long_row", "packed_sdpa_packed_row_mask")}
    (long,) = [row for row in rows["packed_attention"] if row["name"] == "packed_row_mask"]
    assert (long["tokens"], long["row_mask_mb"]) == (32 * 32, 1.0) and math.isfinite(long["ratio_median"])
    assert all(list(row["chunk_ratios"]) == ["16"] and row["chunk_tokens"] == 64 for row in summary.values())
    assert all(math.isfinite(row["operator_vs_autograd"]) and math.isfinite(row["compiled_kept_vs_recompute"])
               and row["compile"] == "aot_eager" for row in summary.values())  # (the CPU: the statistics kept)


def test_every_ratio_row_records_the_command_that_made_it_and_the_commit(rows, tmp_path):
    """Each ratio row names its script's command line with every flag and the code's git commit, which the table
    shows (before 2026-12-05, eighth session, the command was rebuilt from a few settings and flags were lost)."""
    for name, args in SCRIPTS.items():
        for row in (r for r in rows[name] if "ratio_median" in r):
            assert row["argv"] == " ".join(["python", f"bench/{name}.py", *args]), row["argv"]
            assert row["commit"] and row["utc"].endswith("Z") and row["threads"] == 1  # (BENCH_THREADS)
    row = next(r for r in rows["host_time"] if "ratio_median" in r)
    table = _render([{**row, "threads": 2}], tmp_path / "vm-argv.jsonl")  # as `make bench` runs it
    assert f"`{row['argv']}` | {row['commit']} |" in table


def test_render_table_defaults_to_the_latest_dated_results_file(tmp_path):
    """By the date in the name, not the file time (a fresh clone gives every file one time, and rendered the
    oldest); peers' and soak files are never the step-time table."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("render_table", ROOT / "bench" / "render_table.py")
    render_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_table)
    names = ["vm-2026-12-05.jsonl", "vm-2026-11-25.jsonl", "h200-2026-11-28.jsonl",
             "peers-moe-peft-vm-2026-12-09.jsonl", "soak-vm-2026-12-08.jsonl", "learning_check-vm-2026-11-30.jsonl",
             "learning_check-vm-2026-12-01.jsonl",
             "gpu-node-3-2026-12-04.jsonl"]  # (host names with "-", as `make bench` names files)
    for age, name in enumerate(names):  # the oldest file time on the latest name
        (tmp_path / name).write_text("{}\n")
        os.utime(tmp_path / name, (1e9 + age, 1e9 + age))
    assert [p.name for p in render_table.newest_results(tmp_path)] == ["vm-2026-12-05.jsonl",
                                                                        "learning_check-vm-2026-12-01.jsonl"]
    (tmp_path / "gpu-node-3-2026-12-06.jsonl").write_text("{}\n")
    assert render_table.newest_results(tmp_path)[0].name == "gpu-node-3-2026-12-06.jsonl"


def test_render_table_drops_compiled_shapes_rows_timed_in_one_process():
    """Rows from before each variant ran in a process of its own (no "rounds") are superseded by those with rounds,
    as their settings' keys differ ("kind" came later too); with none, the old rows stay."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_table", ROOT / "bench" / "render_table.py")
    render_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_table)
    old = {"name": "compiled_shapes", "shape": "small", "jobs": 4, "case": "varying", "ratio_median": 0.47}
    new = {**old, "kind": "lora", "rounds": 2, "ratio_median": 0.63}
    other = {"name": "host_time", "shape": "tiny", "ratio_median": 2.0}
    assert render_table.latest_rows([old, other, new]) == [other, new]
    assert render_table.latest_rows([old, other]) == [old, other]


def test_interleaved_rounds_alternate_their_order(monkeypatch):
    """Each round runs the steps in the other order than the last, so no step always runs after another's
    allocations; warm-up rounds are not timed."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from common import time_interleaved

    order = []
    times = time_interleaved({name: (lambda name=name: order.append(name)) for name in "abc"}, warmup=1, repeats=2)
    assert "".join(order) == "abccbaabc" and [len(t) for t in times.values()] == [2, 2, 2]
