"""The example scripts run end to end offline with tiny settings (what `make demo` runs, shortened)."""

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import run_in_one_process

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


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
    done = run_in_one_process(plan, cwd=ROOT)  # the imports once instead of seven times
    return root, {name: run["stdout"] if run["error"] is None else f"ERROR {run['error']}"
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
    config = json.loads((runs[0] / script / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"sft_mixlora": "PEFT_MOLE_MIXLORA", "sft_dynmole": "PEFT_MOLE_DYNMOLE"}[script]


def test_sft_dynmole_example_has_no_method_or_top_k(monkeypatch):
    """They were taken and ignored (before 2026-12-08): `sft_dynmole.py --method mixlora` trained DynMoLE."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import sft_mixlora

    for option in (["--top-k", "3"], ["--method", "mixlora"]):
        monkeypatch.setattr(sys, "argv", ["sft_dynmole.py", *option])
        with pytest.raises(SystemExit, match="2"):  # argparse: unrecognized arguments
            sft_mixlora.parse_args("dynmole")
    monkeypatch.setattr(sys, "argv", ["sft_mixlora.py", "--method", "dynmole", "--top-k", "3"])
    with pytest.raises(SystemExit, match="2"):
        sft_mixlora.parse_args()
    monkeypatch.setattr(sys, "argv", ["sft_mixlora.py", "--top-k", "3"])
    assert (sft_mixlora.parse_args().method, sft_mixlora.parse_args().top_k) == ("mixlora", 3)
    monkeypatch.setattr(sys, "argv", ["sft_mixlora.py"])
    assert sft_mixlora.parse_args().top_k == 2


def test_multijob_example_trains_three_kinds_of_jobs(runs):
    printed = output(runs, "multijob")
    for task, kind in [("sentiment", "LoraConfig"), ("opposite", "LoraConfig"), ("capital", "MixLoRAConfig"),
                       ("add", "DynMoLEConfig")]:
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
