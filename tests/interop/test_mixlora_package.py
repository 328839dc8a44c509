"""`mixlora` package interop: an adapter in the package's format, with the package's own forward recorded as the
reference (fixture: bench/peers/make_mixlora_fixture.py; tiny Qwen2 with attention biases, use_rslora), gives the
same logits after `peft-mole convert --from mixlora`; the package's reading of `expert_lora` is followed."""

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

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mixlora_package"


def _ids() -> torch.Tensor:
    return torch.tensor(json.loads((FIXTURE / "input_ids.json").read_text()))


def _logits(adapter_dir) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(FIXTURE / "base"), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def test_converted_adapter_reproduces_the_package_logits(tmp_path):
    command = [sys.executable, "-m", "peft_mole.cli", "convert", "--from", "mixlora", str(FIXTURE / "adapter"),
               str(tmp_path / "converted")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert (config["num_experts"], config["top_k"], config["r"], config["use_rslora"]) == (3, 2, 4, True)
    reference = load_file(FIXTURE / "reference_logits.safetensors")["logits"]
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(FIXTURE / "base")(input_ids=_ids()).logits
    assert (base - reference).abs().max() > 0.1  # the adapter matters
    assert (_logits(tmp_path / "converted") - reference).abs().max().item() < 1e-5


def test_export_for_the_package_writes_act_fn_and_round_trips(tmp_path):
    import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours"), flavour="mixlora")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(FIXTURE / "base")  # resolvable offline: act_fn read from it
    (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps(config))
    export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "theirs"), flavour="mixlora")
    exported = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert exported["act_fn"] == "silu" and "expert_lora" not in exported
    original = torch.load(FIXTURE / "adapter" / "adapter_model.bin", weights_only=True)
    again = torch.load(tmp_path / "theirs" / "adapter_model.bin", weights_only=True)
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


def test_package_export_needs_act_fn_when_the_base_is_not_available(tmp_path):
    import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours"), flavour="mixlora")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "no-such-base")
    (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="act_fn is required"):
        export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "theirs"), flavour="mixlora")
    with pytest.raises(ValueError, match="act_fn must be a transformers activation name"):
        export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "theirs"), flavour="mixlora", act_fn="swish2")
    export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "theirs"), flavour="mixlora", act_fn="silu")
    assert json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["act_fn"] == "silu"


def test_act_fn_comes_from_the_base_config_json_only(tmp_path):
    """A base config transformers itself would reject (or one asking for remote code) is read as JSON, not loaded;
    Gemma's `hidden_activation` wins over `hidden_act`."""
    import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours"), flavour="mixlora")
    base = tmp_path / "odd-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 3,
                                                  "auto_map": {"AutoConfig": "x.Y"}, "hidden_act": "gelu",
                                                  "hidden_activation": "gelu_pytorch_tanh"}))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps(config))
    export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "theirs"))
    assert json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["act_fn"] == "gelu_pytorch_tanh"


def test_experts_only_adapter_exports_its_own_rank_at_the_top_level(tmp_path):
    from peft import get_peft_model

    from tests.helpers import mixlora, tiny_base

    model = get_peft_model(tiny_base(), mixlora(r=8, lora_alpha=8, attn_target_modules=[], attn_r=4, attn_lora_alpha=16))
    model.save_pretrained(tmp_path / "ours")
    for flavour in ("moe-peft", "mixlora"):
        export_moe_peft(str(tmp_path / "ours"), str(tmp_path / flavour), flavour=flavour, act_fn="silu")
        exported = json.loads((tmp_path / flavour / "adapter_config.json").read_text())
        assert (exported["r"], exported["lora_alpha"], "expert_lora" in exported) == (8, 8, False)
        tensors = torch.load(tmp_path / flavour / "adapter_model.bin", weights_only=True)
        assert tensors["mixlora.layers.0.mlp.gate_proj.experts.0.lora_A.weight"].shape[0] == 8


def test_expert_lora_is_read_as_each_reference_reads_it():
    reference = json.loads((FIXTURE / "adapter" / "adapter_config.json").read_text())
    reference["expert_lora"] = {"r": 4, "lora_alpha": 32, "lora_dropout": 0.05}
    assert config_from_moe_peft(reference, "moe-peft").lora_alpha == 32
    with pytest.warns(UserWarning, match=r"ignores `expert_lora` .* top-level \['lora_alpha'\]"):
        assert config_from_moe_peft(reference, "mixlora").lora_alpha == 8
    # a section's own rsLoRA or dropout is ignored by the package too, and named (before 2026-12-06, eighteenth
    # session, converted without a word)
    for section in ({"use_rslora": False}, {"lora_dropout": 0.3}):  # (the package's fixture: rsLoRA, dropout 0.05)
        reference["expert_lora"] = {"r": 4, "lora_alpha": 8, **section}
        with pytest.warns(UserWarning, match=rf"top-level \['{next(iter(section))}'\]"):
            config = config_from_moe_peft(reference, "mixlora")
        assert (config.use_rslora, config.lora_dropout) == (True, 0.05)
    reference["expert_lora"] = {"r": 8, "lora_alpha": 8}
    assert config_from_moe_peft(reference, "moe-peft").r == 8
    with pytest.raises(ValueError, match="cannot load this adapter"):
        config_from_moe_peft(reference, "mixlora")
    with pytest.raises(ValueError, match="flavour must be one of"):
        config_from_moe_peft(reference, "mixlora-0.2")


def test_package_export_refuses_experts_with_their_own_alpha(tmp_path):
    import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours"), flavour="mixlora")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    config["lora_alpha"] = 32  # experts now differ from the attention LoRA (attn_lora_alpha 8)
    (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="export with flavour 'moe-peft'"):
        export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "theirs"), flavour="mixlora", act_fn="silu")
    export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "theirs"), flavour="moe-peft", act_fn="silu")
    assert json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["expert_lora"]["lora_alpha"] == 32
