"""MoE-PEFT interop: an adapter made by MoE-PEFT 2.0.2 itself (fixture: bench/peers/make_moe_peft_fixture.py,
with the reference forward's logits) gives the same logits after `peft-mole convert --from moe-peft`, and
export → import is lossless."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import peft_mole  # noqa: F401
from peft_mole.interop import config_from_moe_peft, export_moe_peft, import_moe_peft

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "moe_peft_mixlora"


def _logits(adapter_dir) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(FIXTURE / "base")
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = torch.tensor(json.loads((FIXTURE / "input_ids.json").read_text()))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_imported_adapter_reproduces_the_reference_logits(tmp_path):
    command = [sys.executable, "-m", "peft_mole.cli", "convert", "--from", "moe-peft", str(FIXTURE / "adapter"),
               str(tmp_path / "converted")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert (config["num_experts"], config["top_k"], config["r"]) == (4, 2, 4)
    reference = load_file(FIXTURE / "reference_logits.safetensors")["logits"]
    logits = _logits(tmp_path / "converted")
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(FIXTURE / "base")(
            input_ids=torch.tensor(json.loads((FIXTURE / "input_ids.json").read_text()))).logits
    assert (base - reference).abs().max() > 0.1  # the adapter matters, so equality below means something
    assert (logits - reference).abs().max().item() < 1e-5


def test_export_then_import_is_lossless(tmp_path):
    import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours"))
    export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "theirs"))
    original = torch.load(FIXTURE / "adapter" / "adapter_model.bin", weights_only=True)
    exported = torch.load(tmp_path / "theirs" / "adapter_model.bin", weights_only=True)
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k].float(), exported[k]) for k in original)
    import_moe_peft(str(tmp_path / "theirs"), str(tmp_path / "again"))
    torch.testing.assert_close(_logits(tmp_path / "again"), _logits(tmp_path / "ours"), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(routing_strategy="mixlora-switch"), "routing_strategy 'mixlora-switch' is not supported"),
        (dict(peft_type="LORA"), "peft_type must be 'MIXLORA'"),
        (dict(use_dora=True), "DoRA"),
    ],
)
def test_unsupported_reference_configs_are_refused(change, match):
    reference = json.loads((FIXTURE / "adapter" / "adapter_config.json").read_text())
    reference.update(change)
    with pytest.raises(ValueError, match=match):
        config_from_moe_peft(reference)
