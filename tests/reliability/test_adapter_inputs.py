"""What a PEFT user hands a routed-experts adapter, taken as PEFT's LoRA takes it: one config object for several
models, weights that lack whole tensors (a router, a layer, an attention factor), an attention mask that does not
cover the tokens, target-module sets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from tests.helpers import METHODS, batch, randomize_adapters, tiny_base


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_one_config_makes_adapters_for_bases_of_two_shapes_each_recording_its_own(method, tmp_path):
    """Before, the first model wrote its base's shape into the user's config and the second `get_peft_model` took
    it for a loaded adapter's ("trained on a base with hidden_size 64"); a shared config also sent the first
    model's saved card the second model's router statistics."""
    config = METHODS[method]()
    small, large = tiny_base(), tiny_base(hidden_size=96, intermediate_size=256)
    first = get_peft_model(small, config)
    second = get_peft_model(large, config)
    assert first.peft_config["default"].base_model_shape["hidden_size"] == 64
    assert second.peft_config["default"].base_model_shape["hidden_size"] == 96
    ids, mask, labels = batch()
    second.train()(input_ids=ids, attention_mask=mask, labels=labels)   # only the second model has routed tokens
    first.save_pretrained(tmp_path / "first")
    assert "Router statistics" not in (tmp_path / "first" / "README.md").read_text()
    second.save_pretrained(tmp_path / "second")
    assert "Router statistics" in (tmp_path / "second" / "README.md").read_text()
    # each saved adapter loads onto its own base only
    PeftModel.from_pretrained(tiny_base(), tmp_path / "first")
    with pytest.raises(ValueError, match=r"hidden_size 96 \(this base: 64\)"):
        PeftModel.from_pretrained(tiny_base(), tmp_path / "second")


def test_one_config_for_two_adapters_of_one_model_gives_each_its_own(tmp_path):
    config = METHODS["mixlora"]()
    model = get_peft_model(tiny_base(), config)
    model.add_adapter("other", config)
    assert model.peft_config["other"] is not model.peft_config["default"]
    assert model.peft_config["other"].to_dict() == model.peft_config["default"].to_dict()


def _saved_without(tmp_path, method: str, dropped: str):
    model = get_peft_model(tiny_base(), METHODS[method]())
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(weights)
    kept = {k: v for k, v in state.items() if dropped not in k}
    assert 0 < len(kept) < len(state)
    save_file(kept, weights, metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize(("method", "dropped", "count"), [
    ("mixlora", "layers.0.mlp.mixlora_router", 1),
    ("dynmole", "layers.0.mlp.dynmole_router", 1),
    ("dynmole-projection", "layers.1.mlp.up_proj.dynmole_router", 1),
    ("mixlora", "layers.1.", 15),
    ("mixlora", "layers.0.self_attn.q_proj.", 2),
])
def test_weights_lacking_a_whole_tensor_of_the_adapter_are_refused(method, dropped, count, low_cpu_mem_usage,
                                                                   tmp_path):
    """Before, a missing router or layer loaded with PEFT's warning and kept its random values (logits 0.41 / 0.52
    from the trained adapter's), or failed deep in torch ("Cannot copy out of meta tensor") under
    `low_cpu_mem_usage`, where a missing attention factor stayed on the meta device (two equal calls 0.13 apart)."""
    _saved_without(tmp_path, method, dropped)
    with pytest.raises(ValueError, match=rf"adapter 'default' lack {count} of its tensors \(model\.layers"):
        PeftModel.from_pretrained(tiny_base(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)


def test_a_partial_state_dict_is_refused_and_a_whole_one_loads_exactly():
    source = get_peft_model(tiny_base(), METHODS["dynmole"]())
    randomize_adapters(source)
    state = get_peft_model_state_dict(source)
    target = get_peft_model(tiny_base(), METHODS["dynmole"]())
    partial = {k: v for k, v in state.items() if "dynmole_router" not in k}
    with pytest.raises(ValueError, match=r"lack 2 of its tensors"):
        set_peft_model_state_dict(target, partial)
    set_peft_model_state_dict(target, state)
    ids, mask, _ = batch()
    with torch.no_grad():
        assert torch.equal(source.eval()(input_ids=ids, attention_mask=mask).logits,
                           target.eval()(input_ids=ids, attention_mask=mask).logits)


def test_a_second_adapter_is_checked_by_its_own_tensors(tmp_path):
    """Loading adapter "other" next to "default" checks only "other"'s tensors."""
    source = get_peft_model(tiny_base(), METHODS["mixlora"]())
    randomize_adapters(source)
    source.save_pretrained(tmp_path / "whole")
    _saved_without(tmp_path / "cut", "mixlora", "layers.1.mlp.mixlora_router")
    model = PeftModel.from_pretrained(tiny_base(), tmp_path / "whole")
    model.load_adapter(tmp_path / "whole", adapter_name="other")
    with pytest.raises(ValueError, match=r"adapter 'third' lack 1 of its tensors"):
        model.load_adapter(tmp_path / "cut", adapter_name="third")


@pytest.mark.parametrize("method", ["mixlora", "dynmole-projection"])
def test_adapters_named_like_a_module_or_a_layer_load_next_to_each_other(method, tmp_path):
    """An adapter owns the tensors named after its module (`...mixlora_router.<adapter>.weight`), not every name
    that holds `.<adapter>.`: the review found "1" refused next to "0" (`layers.1.`), and "mlp" or "gate_proj"."""
    source = get_peft_model(tiny_base(), METHODS[method]())
    randomize_adapters(source)
    source.save_pretrained(tmp_path)
    ids, mask, _ = batch()
    with torch.no_grad():
        expected = source.eval()(input_ids=ids, attention_mask=mask).logits
    for first, second in (("0", "1"), ("default", "mlp"), ("default", "gate_proj"), ("a", "a1")):
        model = PeftModel.from_pretrained(tiny_base(), tmp_path, adapter_name=first)
        model.load_adapter(tmp_path, adapter_name=second)
        model.set_adapter(second)
        with torch.no_grad():
            assert torch.equal(model.eval()(input_ids=ids, attention_mask=mask).logits, expected), (first, second)


def test_weights_of_more_layers_than_the_base_has_are_refused_with_a_config_given(tmp_path):
    """`PeftModel.from_pretrained(base, dir, config=config)` with the config that made the adapter (so it does not
    check the recorded base): PEFT dropped the second layer's tensors silently."""
    config = METHODS["mixlora"]()
    get_peft_model(tiny_base(), config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"hold 15 tensor\(s\) it does not have \(model\.layers\.1\."):
        PeftModel.from_pretrained(tiny_base(num_hidden_layers=1), tmp_path, config=config)


@pytest.mark.parametrize("method", ["mixlora", "dynmole", "dynmole-projection"])
@pytest.mark.parametrize(("mask_shape", "match"), [((2, 5), r"at least 9 columns"), ((1, 9), r"must have 2 rows")])
def test_an_attention_mask_that_does_not_cover_the_tokens_is_named(method, mask_shape, match):
    """Before, DynMoLE failed deep in a layer (`dense_weights`: "size of tensor a (18) must match ... (10)") and
    MixLoRA counted the load-balance loss over the wrong tokens (0.010771 against 0.010100)."""
    model = get_peft_model(tiny_base(), METHODS[method]())
    ids = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=rf"attention_mask .*{match}.*input_ids of shape \(2, 9\)"):
        model(input_ids=ids, attention_mask=torch.ones(mask_shape, dtype=torch.long), labels=ids)
    with pytest.raises(ValueError, match=match):   # the base called directly, through the adapter's hook
        model.base_model.model(input_ids=ids, attention_mask=torch.ones(mask_shape, dtype=torch.long))


_SET_INIT = """
import hashlib, torch, peft_mole
from peft import get_peft_model
from tests.helpers import tiny_base
config = peft_mole.MixLoRAConfig(num_experts=2, r=2, expert_target_modules={"gate_proj", "up_proj", "down_proj"},
                                 attn_target_modules={"q_proj", "k_proj", "v_proj", "o_proj"})
torch.manual_seed(0)
model = get_peft_model(tiny_base(), config)
state = b"".join(p.detach().numpy().tobytes() for _, p in sorted(model.named_parameters()) if p.requires_grad)
print(list({"gate_proj", "up_proj", "down_proj"}))  # the sets' orders in this process
print(list({"q_proj", "k_proj", "v_proj", "o_proj"}))
print(config.expert_target_modules, config.attn_target_modules, hashlib.sha256(state).hexdigest())
"""


def test_target_module_sets_give_one_adapter_whatever_the_string_hashing():
    """A set's order follows PYTHONHASHSEED, and the layers draw their factors in the list's order: before, one seed
    gave another adapter in every process."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    experts, attention, outputs = set(), set(), set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=root)
        done = subprocess.run([sys.executable, "-c", _SET_INIT], env=env, cwd=root, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        lines = done.stdout.strip().splitlines()
        experts.add(lines[-3])
        attention.add(lines[-2])
        outputs.add(lines[-1])
    assert len(experts) == len(attention) == 2, (experts, attention)  # each set in two orders: the check can fail
    assert len(outputs) == 1, outputs
    assert outputs.pop().startswith("['gate_proj', 'up_proj', 'down_proj'] ['q_proj', 'k_proj', 'v_proj', 'o_proj']")


def test_unload_gives_back_the_base_and_a_trained_module_to_save_is_kept_as_peft_does():
    """docs/mixlora.md: `unload()` returns the base; a module in `modules_to_save` comes back trained, as PEFT's."""
    base = tiny_base()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, METHODS["mixlora"](modules_to_save=["lm_head"]))
    randomize_adapters(model)
    unloaded = model.unload()
    state = unloaded.state_dict()
    assert set(state) == set(reference)
    changed = sorted(k for k in reference if not torch.equal(state[k], reference[k]))
    assert changed == ["lm_head.weight"]
