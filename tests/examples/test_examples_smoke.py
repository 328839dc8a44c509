"""The example scripts run end to end offline with tiny settings (what `make demo` runs, shortened)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

# Runs each example as `python examples/<script> <args>` (or `python -m <module> <args>`) runs it, as __main__ with
# its argv and working directory, one after another in one process: the imports once instead of seven times (~7 s
# each). A run that fails gives its traceback or its exit status.
_RUNNER = textwrap.dedent("""
    import contextlib, io, json, os, runpy, sys, traceback
    # the script's folder first on the path, as `python examples/<script>` puts it (not the repository's root:
    # `-c` would; sft_dynmole.py imports sft_mixlora.py)
    sys.path[0] = os.path.join(os.getcwd(), "examples")
    for key, (module, target, args, cwd) in json.loads(sys.argv[1]).items():
        sys.argv, out, error = [target, *args], io.StringIO(), None
        os.chdir(cwd)
        try:
            with contextlib.redirect_stdout(out):
                runpy.run_module(target, run_name="__main__") if module else runpy.run_path(target, run_name="__main__")
        except SystemExit as stop:
            error = None if stop.code in (0, None) else f"exit status {stop.code}"
        except BaseException:  # noqa: BLE001 - reported by the example's test
            error = traceback.format_exc()[-3000:]
        print(json.dumps({"run": key, "stdout": out.getvalue(), "error": error}), flush=True)
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(the output root, {run: its stdout}); each run's files under root/<run>."""
    root = tmp_path_factory.mktemp("examples")
    for name in ("sft_mixlora", "sft_dynmole", "multijob", "yaml", "evaluate", "push"):
        (root / name).mkdir()
    sft = ["--max-steps", "4", "--eval-rows", "8", "--num-experts", "4", "--r", "4"]
    plan = {
        "sft_mixlora": (False, str(EXAMPLES / "sft_mixlora.py"), ["--output-dir", str(root / "sft_mixlora"), *sft],
                        str(ROOT)),
        "sft_dynmole": (False, str(EXAMPLES / "sft_dynmole.py"), ["--output-dir", str(root / "sft_dynmole"), *sft],
                        str(ROOT)),
        "multijob": (False, str(EXAMPLES / "multijob.py"), ["--output-dir", str(root / "multijob"), "--max-steps", "6",
                                                            "--eval-rows", "4"], str(ROOT)),
        # jobs.yaml with the command line, on the data `multijob.py --prepare-only` writes where it runs
        "prepare": (False, str(EXAMPLES / "multijob.py"), ["--prepare-only"], str(root / "yaml")),
        "yaml": (True, "peft_mole.cli", ["train", str(EXAMPLES / "jobs.yaml")], str(root / "yaml")),
        "evaluate": (False, str(EXAMPLES / "evaluate_adapters.py"), ["--output-dir", str(root / "evaluate"),
                                                                     "--limit", "8"], str(ROOT)),
        "push": (False, str(EXAMPLES / "push_to_hub.py"), ["--output-dir", str(root / "push")], str(ROOT)),
    }
    result = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(plan)], capture_output=True, text=True,
                            timeout=1200, cwd=ROOT)
    done = {run["run"]: run for run in (json.loads(line) for line in result.stdout.splitlines()
                                        if line.startswith('{"run"'))}
    assert list(done) == list(plan), f"the runner stopped after {list(done)}: {result.stderr[-3000:]}"
    assert result.returncode == 0, result.stderr[-3000:]  # (what fails at exit: threads, atexit)
    return root, {name: run["stdout"] if run["error"] is None else f"ERROR {run['error']}: {result.stderr[-2000:]}"
                  for name, run in done.items()}


def output(runs, name: str) -> str:
    """What run `name` printed; its error where it failed."""
    printed = runs[1][name]
    assert not printed.startswith("ERROR "), printed
    return printed


@pytest.mark.parametrize("script", ["sft_mixlora", "sft_dynmole"])
def test_sft_example_runs_saves_and_reloads(script, runs):
    printed = output(runs, script)
    assert "logits identical = True" in printed
    assert "accuracy after (reloaded adapter)" in printed and "router statistics after training" in printed
    assert (runs[0] / script / "adapter" / "adapter_model.safetensors").exists()
    assert (runs[0] / script / "run" / "router_stats.png").exists()


def test_multijob_example_trains_three_kinds_of_jobs(runs):
    printed = output(runs, "multijob")
    for task, kind in [("sentiment", "LoraConfig"), ("capital", "MixLoRAConfig"), ("add", "DynMoLEConfig")]:
        assert f"{task:<10} {kind}" in printed
        assert (runs[0] / "multijob" / "run" / task / "adapter_model.safetensors").exists()


def test_jobs_yaml_runs_with_the_cli(runs):
    output(runs, "prepare")
    output(runs, "yaml")
    run = runs[0] / "yaml" / "build" / "demo-multijob" / "yaml-run"
    assert '"status": "done"' in (run / "add" / "job_state.json").read_text()
    assert sorted(p.name for p in run.iterdir()) == ["add", "capital", "jobs_summary.json", "sentiment"]


def test_evaluate_adapters_example_one_pass_equals_one_at_a_time(runs):
    printed = output(runs, "evaluate")
    assert "same accuracies: True" in printed and "| adapter3 |" in printed


def test_push_to_hub_example_dry_run(runs):
    printed = output(runs, "push")
    assert "logits identical = True" in printed
    card = (runs[0] / "push" / "adapter" / "README.md").read_text()
    assert "peft-mole" in card and "| demo_task | 1.0000 |" in card
