"""The example scripts run end to end offline with tiny settings (what `make demo` runs, shortened)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", ["sft_mixlora.py", "sft_dynmole.py"])
def test_sft_example_runs_saves_and_reloads(script, tmp_path):
    command = [sys.executable, str(ROOT / "examples" / script), "--output-dir", str(tmp_path), "--max-steps", "4",
               "--eval-rows", "8", "--num-experts", "4", "--r", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logits identical = True" in result.stdout
    assert "accuracy after (reloaded adapter)" in result.stdout and "router statistics after training" in result.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "run" / "router_stats.png").exists()


def test_multijob_example_trains_three_kinds_of_jobs(tmp_path):
    command = [sys.executable, str(ROOT / "examples" / "multijob.py"), "--output-dir", str(tmp_path),
               "--max-steps", "6", "--eval-rows", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for task, kind in [("sentiment", "LoraConfig"), ("capital", "MixLoRAConfig"), ("add", "DynMoLEConfig")]:
        assert f"{task:<10} {kind}" in result.stdout
        assert (tmp_path / "run" / task / "adapter_model.safetensors").exists()


def test_jobs_yaml_runs_with_the_cli(tmp_path):
    prepare = [sys.executable, str(ROOT / "examples" / "multijob.py"), "--prepare-only"]
    assert subprocess.run(prepare, capture_output=True, text=True, timeout=300, cwd=tmp_path).returncode == 0
    train = [sys.executable, "-m", "peft_mole.cli", "train", str(ROOT / "examples" / "jobs.yaml")]
    result = subprocess.run(train, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "build" / "demo-multijob" / "yaml-run"
    assert '"status": "done"' in (run / "add" / "job_state.json").read_text()
    assert sorted(p.name for p in run.iterdir()) == ["add", "capital", "jobs_summary.json", "sentiment"]


def test_evaluate_adapters_example_one_pass_equals_one_at_a_time(tmp_path):
    command = [sys.executable, str(ROOT / "examples" / "evaluate_adapters.py"), "--output-dir", str(tmp_path),
               "--limit", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same accuracies: True" in result.stdout and "| adapter3 |" in result.stdout


def test_push_to_hub_example_dry_run(tmp_path):
    command = [sys.executable, str(ROOT / "examples" / "push_to_hub.py"), "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logits identical = True" in result.stdout
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "peft-mole" in card and "| demo_task | 1.0000 |" in card
