"""Bad-input matrix, saved adapters: edited configs, broken or pickled weight files and the wrong base fail early
with an error naming the file or field; nothing loads half-way."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_mole
from tests.helpers import METHODS, batch, randomize_adapters, tiny_base


@pytest.fixture(scope="module", params=["mixlora", "dynmole"])
def saved(request, tmp_path_factory):
    model = get_peft_model(tiny_base(), METHODS[request.param]())
    randomize_adapters(model)
    path = tmp_path_factory.mktemp(request.param) / "adapter"
    model.save_pretrained(path)
    return path


def _copy(saved, tmp_path):
    target = tmp_path / "adapter"
    shutil.copytree(saved, target)
    return target


def _edit_config(path, change) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    change(config)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_unknown_config_key_warns_and_loads(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _edit_config(path, lambda c: c.update(from_the_future=1))
    with pytest.warns(UserWarning, match="from_the_future"):
        model = PeftModel.from_pretrained(tiny_base(), path)
    assert isinstance(model.peft_config["default"], (peft_mole.MixLoRAConfig, peft_mole.DynMoLEConfig))


def test_every_required_config_key_is_refused_by_name_when_missing(saved, tmp_path):
    """Each of the config type's `REQUIRED_ON_LOAD` keys (routing ones included), taken out of a saved config:
    loading fails naming it, before any weight is loaded."""
    saved_type = json.loads((saved / "adapter_config.json").read_text())["peft_type"]
    config_type = {"PEFT_MOLE_MIXLORA": peft_mole.MixLoRAConfig, "PEFT_MOLE_DYNMOLE": peft_mole.DynMoLEConfig}[saved_type]
    assert {"num_experts", "r", "lora_alpha"} <= set(config_type.REQUIRED_ON_LOAD)
    for key in config_type.REQUIRED_ON_LOAD:
        path = _copy(saved, tmp_path / key)
        _edit_config(path, lambda c, key=key: c.pop(key))
        with pytest.raises(ValueError, match=rf"lacks \['{key}'\]"):
            PeftModel.from_pretrained(tiny_base(), path)


def _truncate_header(path):
    with open(path, "r+b") as f:
        f.truncate(100)


def _truncate_data(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 64)


def _garbage(path):
    path.write_bytes(b"\x00" * 64)


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate_header, _truncate_data, _garbage, _empty])
def test_damaged_weights_file_is_named(saved, tmp_path, damage):
    path = _copy(saved, tmp_path)
    damage(path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is not a readable safetensors file"):
        PeftModel.from_pretrained(tiny_base(), path)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("dropped", ["self_attn.q_proj.{prefix}_B", "mlp.{prefix}_experts.up_proj_lora_A", "magnitude"])
def test_a_weights_file_missing_a_factor_or_a_dora_magnitude_is_refused(dropped, low_cpu_mem_usage, tmp_path):
    """Before, PEFT warned of missing keys and kept their initial values (B = 0, or the initial DoRA magnitudes): a
    half-trained adapter that looked loaded; with low_cpu_mem_usage=True, "Cannot copy out of meta tensor"."""
    from safetensors.torch import save_file

    model = get_peft_model(tiny_base(), METHODS["mixdora"]())
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(weights)
    cut = "magnitude" if dropped == "magnitude" else "layers.1." + dropped.format(prefix="mixlora")
    kept = {k: v for k, v in state.items() if not k.endswith(cut)}
    assert len(kept) < len(state)
    save_file(kept, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"adapter_model.safetensors lacks \d+ tensor\(s\).*use_dora=True"):
        PeftModel.from_pretrained(tiny_base(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)


def test_pickle_adapter_is_refused_until_converted(saved, tmp_path):
    path = _copy(saved, tmp_path)
    state = load_file(path / "adapter_model.safetensors")
    torch.save(state, path / "adapter_model.bin")
    os.remove(path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="holds only a pickle adapter_model.bin.*convert_bin_adapter"):
        PeftModel.from_pretrained(tiny_base(), path)
    peft_mole.convert_bin_adapter(str(path))  # the explicit opt-in
    reference = PeftModel.from_pretrained(tiny_base(), saved).eval()
    converted = PeftModel.from_pretrained(tiny_base(), path).eval()
    ids, mask, _ = batch(2, 6)
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids, attention_mask=mask).logits,
                           converted(input_ids=ids, attention_mask=mask).logits)


def test_the_load_checks_run_when_the_config_is_given_or_the_adapter_name_exists(saved, tmp_path, monkeypatch):
    """`PeftModel.from_pretrained(base, path, config=PeftConfig.from_pretrained(path))` and `load_adapter(path, name)`
    for a name the model has read no config of ours: PEFT's weight loader fell back to `torch.load` of a pickle and
    took a missing `top_k` as its default. The same refusals now run there, before any file is read."""
    from peft import PeftConfig

    path = _copy(saved, tmp_path)
    state = load_file(path / "adapter_model.safetensors")
    torch.save(state, path / "adapter_model.bin")
    os.remove(path / "adapter_model.safetensors")
    config = PeftConfig.from_pretrained(path)  # (PeftConfig's loader: no check of ours)
    pickles = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: pickles.append(a) or {})
    with pytest.raises(ValueError, match="holds only a pickle adapter_model.bin.*convert_bin_adapter"):
        PeftModel.from_pretrained(tiny_base(), path, config=config)
    model = PeftModel.from_pretrained(tiny_base(), saved)
    with pytest.raises(ValueError, match="holds only a pickle adapter_model.bin"):
        model.load_adapter(str(path), adapter_name="default")
    assert pickles == []
    monkeypatch.undo()

    lacking = _copy(saved, tmp_path / "lacking")
    _edit_config(lacking, lambda c: c.pop("num_experts"))
    with pytest.raises(ValueError, match=r"lacks \['num_experts'\]"):
        PeftModel.from_pretrained(tiny_base(), lacking, config=config)
    again = PeftModel.from_pretrained(tiny_base(), saved, config=PeftConfig.from_pretrained(saved)).eval()
    ids, mask, _ = batch(2, 6)
    with torch.no_grad():  # a sound folder loads as before, exactly
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits,
                           model.eval()(input_ids=ids, attention_mask=mask).logits)


def test_save_pretrained_as_a_pickle_is_refused(saved, tmp_path):
    """`safe_serialization=False` (also Trainer's `save_safetensors=False`) wrote an adapter_model.bin that loading
    refuses; the config is not written beside it, so no folder looks like a saved adapter."""
    model = PeftModel.from_pretrained(tiny_base(), saved)
    with pytest.raises(ValueError, match="safe_serialization=False wrote a pickle adapter_model.bin.*safetensors"):
        model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled" / "adapter_config.json").exists()


def test_a_hub_repo_with_a_pickle_alone_is_refused_before_it_is_read(monkeypatch):
    """As a local folder is (before: PEFT downloaded and read the pickle); the Hub is asked for the file names."""
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    from peft_mole.tuners.load_checks import check_weights_file

    files, asked = {"adapter_config.json", "adapter_model.bin"}, []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # (the tests run offline)

    def file_exists(repo_id, filename, revision=None, token=None):
        asked.append((repo_id, filename, revision))
        return filename in files

    monkeypatch.setattr(huggingface_hub, "file_exists", file_exists)
    with pytest.raises(ValueError, match="Hub repo 'someone/binonly' holds only a pickle adapter_model.bin"):
        peft_mole.MixLoRAConfig.from_pretrained("someone/binonly", revision="dev")
    assert asked[0] == ("someone/binonly", "adapter_model.safetensors", "dev")
    files.add("adapter_model.safetensors")
    check_weights_file("someone/binonly")  # safetensors there: nothing to refuse
    asked.clear()
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: "/cache/adapter.safetensors")
    check_weights_file("someone/binonly")
    assert asked == []  # in the local cache: the Hub is not asked

    def offline(*args, **kwargs):
        raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub, "file_exists", offline)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    check_weights_file("someone/binonly")  # neither the Hub nor the cache can say: PEFT's download says what is wrong


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="not a flat dict of named tensors"):
        peft_mole.convert_bin_adapter(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        peft_mole.convert_bin_adapter(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(hidden_size=96), r"hidden_size 64 \(this base: 96\)"),
        (dict(intermediate_size=200), r"intermediate_size 172 \(this base: 200\)"),
        (dict(num_hidden_layers=3), r"num_hidden_layers 2 \(this base: 3\)"),
        (dict(num_hidden_layers=1), r"num_hidden_layers 2 \(this base: 1\)"),
    ],
)
def test_adapter_on_a_base_of_another_shape_is_refused(saved, overrides, match):
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(tiny_base(**overrides), saved)


def test_another_vocabulary_warns(saved):
    with pytest.warns(UserWarning, match="vocab_size 512, this base has 300"):
        PeftModel.from_pretrained(tiny_base(vocab_size=300), saved)


def test_another_model_type_of_the_same_sizes_warns(saved):
    with pytest.warns(UserWarning, match="trained on a 'llama' base, this base is 'qwen2'"):
        PeftModel.from_pretrained(tiny_base("qwen2"), saved)


def test_model_without_gated_mlp_and_unmatched_layers_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="needs a decoder with gated MLP blocks"):
        get_peft_model(gpt2, peft_mole.MixLoRAConfig(num_experts=2, top_k=1))
    with pytest.raises(ValueError, match=r"layers_to_transform=\[7\] matches no decoder layer"):
        get_peft_model(tiny_base(), peft_mole.MixLoRAConfig(num_experts=2, top_k=1, layers_to_transform=[7]))
    with pytest.raises(ValueError, match="num_experts has 3 entries but the model has 2"):
        get_peft_model(tiny_base(), peft_mole.DynMoLEConfig(num_experts=[2, 4, 6]))


def test_fused_gate_up_mlp_is_refused_with_the_layout_named():
    from transformers import Phi3Config, Phi3ForCausalLM

    phi3 = Phi3ForCausalLM(Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=100, pad_token_id=0))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp \(Phi3MLP\) fuses gate and up in one gate_up_proj"):
        get_peft_model(phi3, peft_mole.MixLoRAConfig(num_experts=2, top_k=1))
