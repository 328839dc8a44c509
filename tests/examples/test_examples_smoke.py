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
