"""MoE-PEFT interop: an adapter made by MoE-PEFT 2.0.2 itself (fixture: bench/peers/make_moe_peft_fixture.py,
with the reference forward's logits) gives the same logits after `peft-mole convert --from moe-peft`, and
export → import is lossless."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import peft_mole  # noqa: F401
from peft_mole.cli import main
from peft_mole.interop import config_from_moe_peft, export_moe_peft, import_moe_peft
from peft_mole.interop.moe_peft import _check_reference_values

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
    reference_config = json.loads((FIXTURE / "adapter" / "adapter_config.json").read_text())
    # the same load-balance weight: MoE-PEFT's loss (Mixtral's) is top_k times ours
    assert config["router_aux_loss_coef"] == pytest.approx(2 * reference_config.get("router_aux_loss_coef", 0.001))
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
    coefficients = [json.loads((tmp_path / name / "adapter_config.json").read_text())["router_aux_loss_coef"]
                    for name in ("ours", "theirs", "again")]
    assert coefficients[0] == coefficients[2] == pytest.approx(2 * coefficients[1])
    torch.testing.assert_close(_logits(tmp_path / "again"), _logits(tmp_path / "ours"), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(routing_strategy="mixlora-switch"), "routing_strategy 'mixlora-switch' is not supported"),
        (dict(peft_type="LORA"), "peft_type must be 'MIXLORA'"),
        (dict(use_dora=True), "DoRA"),
        (dict(expert_lora={"r": 4, "lora_alpha": 8, "use_dora": True}), "DoRA"),  # (converted before 2026-12-06)
    ],
)
def test_unsupported_reference_configs_are_refused(change, match):
    reference = json.loads((FIXTURE / "adapter" / "adapter_config.json").read_text())
    reference.update(change)
    with pytest.raises(ValueError, match=match):
        config_from_moe_peft(reference)


@pytest.mark.parametrize(("experts", "attention"), [(True, False), (False, True), (True, True)])
def test_rslora_of_the_expert_section_or_the_attention_keeps_each_scale(experts, attention):
    """MoE-PEFT reads `expert_lora.use_rslora` for the experts and the top-level one for attention; before, the
    section's was ignored (logits 0.53 off). MixLoRAConfig has one flag: the attention's scale goes to its alpha."""
    reference = json.loads((FIXTURE / "adapter" / "adapter_config.json").read_text())
    reference.update(r=4, lora_alpha=8, use_rslora=attention, expert_lora={"r": 2, "lora_alpha": 6,
                                                                          "use_rslora": experts})
    config = config_from_moe_peft(reference)

    def scale(alpha, r, rslora):
        return alpha / r**0.5 if rslora else alpha / r

    assert scale(config.lora_alpha, config.r, config.use_rslora) == pytest.approx(scale(6, 2, experts), rel=1e-12)
    assert scale(config.attn_lora_alpha, config.attn_r, config.use_rslora) == pytest.approx(scale(8, 4, attention),
                                                                                             rel=1e-12)


def test_convert_never_writes_over_the_source_or_another_adapter_and_writes_atomically(tmp_path, monkeypatch):
    """DST == SRC and a DST holding files are refused (unless overwrite=True, which replaces it whole); a write
    that fails leaves DST as it was. Before, `convert --to moe-peft X X` turned an adapter into an unloadable mix of
    both formats, and a failed write left a config beside older weights."""
    import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours"))
    with pytest.raises(ValueError, match="is the input folder"):
        export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "ours"))
    with pytest.raises(ValueError, match="is not empty"):
        import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours"))
    with pytest.raises(ValueError, match=r"lies under .*adapter_config.json, which is a file"):
        import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours" / "adapter_config.json" / "x"))
    before = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    from peft_mole.interop import moe_peft

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(moe_peft, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours"), overwrite=True)
    with pytest.raises(OSError, match="No space"):
        import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ours"]
    after = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.undo()
    import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours"), overwrite=True)
    (tmp_path / "models").mkdir()  # a DST that holds the source (or the working directory): replacing it deletes it
    import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "models" / "src"))
    with pytest.raises(ValueError, match="holds"):
        export_moe_peft(str(tmp_path / "models" / "src"), str(tmp_path / "models"), overwrite=True)
    assert (tmp_path / "models" / "src" / "adapter_model.safetensors").exists()
    result = subprocess.run([sys.executable, "-m", "peft_mole.cli", "convert", "--to", "moe-peft",
                             str(tmp_path / "ours"), str(tmp_path / "ours")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "is the input folder" in result.stderr
    assert "Traceback" not in result.stderr


def _reference(tmp_path, drop=(), config_change=None, rank=None, edit=None) -> Path:
    """A copy of the MoE-PEFT fixture adapter with tensors dropped, its config changed or its experts' rank cut."""
    folder = tmp_path / "reference"
    folder.mkdir()
    config = json.loads((FIXTURE / "adapter" / "adapter_config.json").read_text())
    config.update(config_change or {})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    state = torch.load(FIXTURE / "adapter" / "adapter_model.bin", weights_only=True)
    state = {k: v for k, v in state.items() if not any(part in k for part in drop)}
    if rank is not None:
        state = {k: (v[:rank] if ".experts." in k and "lora_A" in k else v) for k, v in state.items()}
    if edit is not None:
        edit(state)
    torch.save(state, folder / "adapter_model.bin")
    return folder


_GATE0 = "mixlora.layers.0.mlp.moe_gate.weight"
_UP_A1 = "mixlora.layers.1.mlp.up_proj.experts.0.lora_A.weight"
_UP_A_OF_LAYER_1 = re.compile(r"layers\.1\.mlp\.up_proj\.experts\.\d+\.lora_A").search


def test_tensors_sharing_storage_convert(tmp_path):
    """A pickle may hold two tensors on one storage, which safetensors refuses to write (before: a traceback)."""
    shared = "mixlora.layers.0.self_attn.k_proj.lora_A.weight"
    query = "mixlora.layers.0.self_attn.q_proj.lora_A.weight"
    source = _reference(tmp_path, edit=lambda s: s.update({shared: s[query]}))
    import_moe_peft(str(source), str(tmp_path / "out"))
    converted = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert torch.equal(converted["base_model.model.model.layers.0.self_attn.k_proj.mixlora_A"],
                       converted["base_model.model.model.layers.0.self_attn.q_proj.mixlora_A"])


@pytest.mark.parametrize(
    ("case", "match"),
    [
        (dict(drop=("layers.1.mlp.moe_gate",)), "layer 1 has no router"),
        (dict(drop=("self_attn.q_proj.lora_B",)), r"lacks \['self_attn.q_proj.lora_B'\]"),
        (dict(config_change={"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]}),
         "which target_modules does not name"),
        (dict(rank=2), "not rank 4"),
        # converted with exit 0 before 2026-12-06, and failed only when loaded (or never: a layer missing whole)
        (dict(edit=lambda s: s.update({_GATE0: s[_GATE0][:3]})), r"routers \(moe_gate\) have shapes \[\(3, \d+\), "),
        (dict(edit=lambda s: s.update({_UP_A1: s[_UP_A1][:, :-1]})),
         r"layer 1 up_proj lora_A has shapes .* across its experts"),
        (dict(edit=lambda s: s.update({k: s[k][:, :-1] for k in list(s) if _UP_A_OF_LAYER_1(k)})),
         r"up_proj lora_A has shapes .* across layers; it must have one shape with the hidden size"),
        (dict(drop=("layers.0.",)), r"layers \[0\] have no tensors, while layer 1 has"),
        (dict(drop=("mixlora.",)), "holds no MixLoRA tensors"),
    ],
)
def test_incomplete_or_inconsistent_references_are_refused(tmp_path, case, match):
    """Before, these converted with exit 0 and computed otherwise (a layer without its router got a random one,
    tensors of projections outside target_modules were dropped: logits off by up to 0.47) or failed at load."""
    source = _reference(tmp_path, **case)
    if "config_change" in case:  # (the fixture targets every projection: check that the case drops one)
        assert "down_proj" in json.loads((FIXTURE / "adapter" / "adapter_config.json").read_text())["target_modules"]
    with pytest.raises(ValueError, match=match):
        import_moe_peft(str(source), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_keeps_what_the_format_holds_and_refuses_what_it_cannot(tmp_path):
    """attn_lora_alpha is written as given (not replaced by lora_alpha), an expert dropout other than
    the attention's goes to `expert_lora`, and layers_to_transform, which the format cannot say, is refused."""
    import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours"))
    config_path = tmp_path / "ours" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(attn_lora_alpha=8, lora_dropout=0.1, attn_lora_dropout=0.0)
    config_path.write_text(json.dumps(config))
    export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "theirs"))
    exported = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert exported["lora_alpha"] == 8
    assert exported["expert_lora"]["lora_dropout"] == 0.1
    import_moe_peft(str(tmp_path / "theirs"), str(tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (again["attn_lora_alpha"], again["lora_dropout"]) == (8, 0.1)
    # what MoE-PEFT's config check asserts: lora_dropout > 0 in `expert_lora` too, lora_alpha an int, floats
    config.update(lora_dropout=0.0, attn_lora_dropout=0.05, lora_alpha=16.0, jitter_noise=0, router_init_std=1)
    config_path.write_text(json.dumps(config))
    export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "checked"))
    exported = json.loads((tmp_path / "checked" / "adapter_config.json").read_text())
    assert exported["expert_lora"]["lora_dropout"] == 1e-3 and exported["lora_dropout"] == 0.05
    assert type(exported["expert_lora"]["lora_alpha"]) is int and exported["expert_lora"]["lora_alpha"] == 16
    assert type(exported["lora_alpha"]) is int
    assert type(exported["jitter_noise"]) is float and type(exported["router_init_range"]) is float
    config.update(attn_lora_alpha=2.5)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="stores lora_alpha as an int, and this adapter's is 2.5"):
        export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "fraction"))
    config.update(layers_to_transform=[1], attn_lora_alpha=8)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layers_to_transform"):
        export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "layers"))


class _RunsACommand:
    def __reduce__(self):
        return os.system, ("true",)


def test_garbage_weights_and_wrong_folders_give_one_line_errors(tmp_path):
    source = _reference(tmp_path)
    (source / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot be read as tensors"):
        import_moe_peft(str(source), str(tmp_path / "out"))
    torch.save({"w": torch.ones(1), "f": print}, source / "adapter_model.bin")  # a pickle that refers to code
    with pytest.raises(ValueError, match=r"cannot be read as tensors \(UnpicklingError: WeightsUnpickler error: "
                                         "Unsupported global") as refused:
        import_moe_peft(str(source), str(tmp_path / "out"))
    assert "\n" not in str(refused.value)  # (torch's own message runs over 6 lines)
    with open(source / "adapter_model.bin", "wb") as file:  # a pickle that would run a command: its reason named
        pickle.dump({"w": _RunsACommand()}, file, protocol=2)
    with pytest.raises(ValueError, match=r"\(UnpicklingError: Trying to load unsupported GLOBAL posix.system whose "
                                         r"module posix is blocked.\)$"):
        import_moe_peft(str(source), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="MoE-PEFT adapter already"):
        export_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "out"))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"num_experts": None}, "num_experts must be an int >= 1, got None"),
        ({"top_k": "2"}, "top_k must be an int >= 1, got '2'"),
        ({"r": 0}, "r must be an int >= 1, got 0"),
        ({"lora_alpha": None}, "lora_alpha must be a number, got None"),
        ({"expert_lora": ["x"]}, r"expert_lora must be a mapping of the experts' LoRA settings, got \['x'\]"),
        ({"expert_lora": {"lora_alpha": "8"}}, "expert_lora.lora_alpha must be a number, got '8'"),
        ({"expert_lora": {"r": 2.5}}, "expert_lora.r must be an int >= 1, got 2.5"),
        ({"router_aux_loss_coef": None}, "router_aux_loss_coef must be a number, got None"),
        ({"use_rslora": "false"}, "use_rslora must be true or false, got 'false'"),
        ({"expert_lora": {"use_rslora": 1}}, "expert_lora.use_rslora must be true or false, got 1"),
    ],
)
def test_malformed_reference_configs_end_in_one_line_naming_the_field(tmp_path, change, match):
    """Before 2026-12-06, eighteenth session: TypeError or AttributeError tracebacks from `peft-mole convert`."""
    source = _reference(tmp_path, config_change=change)
    with pytest.raises(SystemExit, match=f"peft-mole convert: .*adapter_config.json: {match}"):
        main(["convert", str(source), str(tmp_path / "out"), "--from", "moe-peft"])
    assert not (tmp_path / "out").exists()


def test_a_peft_mole_config_of_another_form_ends_in_one_line(tmp_path):
    import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours"))
    (tmp_path / "ours" / "adapter_config.json").write_text("[]")
    with pytest.raises(SystemExit, match="peft-mole convert: .*ours/adapter_config.json is not a JSON object"):
        main(["convert", str(tmp_path / "ours"), str(tmp_path / "theirs"), "--to", "moe-peft"])


def test_an_act_fn_other_than_the_bases_is_warned_about(tmp_path, monkeypatch):
    """MoE-PEFT computes experts with the config's act_fn, peft-mole with the base MLP's activation: where they
    differ (or the base cannot be read to compare) the import says so (before: silently)."""
    monkeypatch.chdir(FIXTURE)  # the fixture's base_model_name_or_path is "base", relative to it
    source = _reference(tmp_path, config_change={"act_fn": "gelu"})
    with pytest.warns(UserWarning, match="differs from the base model's activation 'silu'"):
        import_moe_peft(str(source), str(tmp_path / "out"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "same"))  # silu on a silu base: nothing to say


def test_a_silu_act_fn_is_not_warned_about_where_the_base_cannot_be_read(tmp_path, monkeypatch):
    """Run from another folder, the fixture's relative base "base" cannot be read: act_fn "silu" (the activation of
    the MLPs MixLoRA targets) converts silently, "gelu" is warned about (before: "silu" warned that it differs from
    the base's activation None, on a conversion equal to the reference)."""
    import warnings

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "silu"))
    source = _reference(tmp_path, config_change={"act_fn": "gelu"})
    with pytest.warns(UserWarning, match="cannot be read here"):
        import_moe_peft(str(source), str(tmp_path / "gelu"))


def test_mixlora_flavour_export_with_only_the_dropout_differing_warns(tmp_path):
    """The package reads one lora_dropout (dropout only matters in training): the export goes on with a warning
    (the first version of this session's change refused it, naming equal r and alpha as the difference)."""
    import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours"))
    config_path = tmp_path / "ours" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(lora_dropout=0.1, attn_lora_dropout=0.0)
    config_path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="one lora_dropout"):
        export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "pkg"), flavour="mixlora", act_fn="silu")
    assert "expert_lora" not in json.loads((tmp_path / "pkg" / "adapter_config.json").read_text())


def test_router_loss_false_and_the_packages_jitter(tmp_path):
    """Found by a review (2026-12-08): `router_loss: false` (MoE-PEFT adds no load-balance loss) was imported with
    the coefficient kept; the `mixlora` package jitters the MoE input in every forward, inference too, so an export
    for it writes jitter 0 (warned), and an import from it warns."""
    reference = json.loads((FIXTURE / "adapter" / "adapter_config.json").read_text())
    assert config_from_moe_peft(reference).router_aux_loss_coef > 0
    assert config_from_moe_peft({**reference, "router_loss": False}).router_aux_loss_coef == 0.0
    assert config_from_moe_peft({**reference, "router_loss": True}).router_aux_loss_coef > 0
    with pytest.raises(ValueError, match="router_loss must be true or false, got 'no'"):
        _check_reference_values("x", {**reference, "router_loss": "no"})
    with pytest.warns(UserWarning, match="jitters the MoE input in every forward"):
        assert config_from_moe_peft({**reference, "jitter_noise": 0.01}, flavour="mixlora").jitter_noise == 0.01
    import_moe_peft(str(FIXTURE / "adapter"), str(tmp_path / "ours"))
    config_path = tmp_path / "ours" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "jitter_noise": 0.01}))
    with pytest.warns(UserWarning, match="jitter_noise=0.01 is written as 0 for the `mixlora` package"):
        export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "pkg"), flavour="mixlora", act_fn="silu")
    export_moe_peft(str(tmp_path / "ours"), str(tmp_path / "moe"))
    assert [json.loads((tmp_path / name / "adapter_config.json").read_text())["jitter_noise"]
            for name in ("pkg", "moe")] == [0.0, 0.01]
