"""Bad-input matrix, configs: every field of MixLoRAConfig and DynMoLEConfig out of range or of the wrong type
raises a TypeError/ValueError that names the field (and, for ranges, what is allowed)."""

from __future__ import annotations

import re

import pytest
from peft import get_peft_model

from peft_mole import DynMoLEConfig, MixLoRAConfig
from tests.helpers import tiny_base

COMMON = [
    ("num_experts", 0, ValueError), ("num_experts", -2, ValueError), ("num_experts", "8", TypeError),
    ("num_experts", 2.5, TypeError), ("num_experts", [], ValueError), ("num_experts", [2, 0], ValueError),
    ("r", 0, ValueError), ("r", -4, ValueError), ("r", 1.5, TypeError), ("r", True, TypeError),
    ("lora_alpha", -1, ValueError), ("lora_alpha", "16", TypeError),
    ("lora_dropout", 1.0, ValueError), ("lora_dropout", -0.1, ValueError), ("lora_dropout", "0.1", TypeError),
    ("use_rslora", "yes", TypeError), ("use_dora", 1, TypeError),
    ("expert_target_modules", ["fc1"], ValueError), ("expert_target_modules", "gate_proj", TypeError),
    ("expert_target_modules", [], ValueError), ("expert_target_modules", ["up_proj", "up_proj"], ValueError),
    ("attn_target_modules", ["qkv"], ValueError), ("attn_target_modules", "q_proj", TypeError),
    ("attn_r", 0, ValueError), ("attn_r", "8", TypeError), ("attn_lora_alpha", -2, ValueError),
    ("attn_lora_dropout", 1.5, ValueError), ("jitter_noise", -0.1, ValueError), ("jitter_noise", 1.0, ValueError),
    ("router_init_std", -0.02, ValueError), ("router_init_std", "0.02", TypeError),
    ("layers_to_transform", -1, ValueError), ("layers_to_transform", "0", TypeError),
    ("layers_to_transform", [0, -3], ValueError), ("bias", "all", ValueError), ("modules_to_save", "lm_head", TypeError),
    ("lora_alpha", float("nan"), ValueError), ("lora_dropout", float("nan"), ValueError),
    ("router_init_std", float("inf"), ValueError),
    # set from attn_target_modules and expert_target_modules; a LoRA habit must not be silently dropped
    ("target_modules", ["q_proj", "v_proj"], ValueError), ("target_modules", "all-linear", ValueError),
]
MIXLORA = [
    ("top_k", 0, ValueError), ("top_k", 9, ValueError), ("top_k", "2", TypeError),
    ("router_aux_loss_coef", -0.01, ValueError), ("router_aux_loss_coef", "0.01", TypeError),
]
DYNMOLE = [
    ("q", 0, ValueError), ("q", -1.1, ValueError), ("q", "1.1", TypeError),
    ("top_p", 0.0, ValueError), ("top_p", 1.5, ValueError), ("broadcast_threshold", -0.1, ValueError),
    ("broadcast_threshold", 1.5, ValueError), ("min_experts", 0, ValueError), ("min_experts", 9, ValueError),
    ("entropy_loss_coef", -1.0, ValueError), ("lb_loss_coef", -1.0, ValueError), ("renormalize", "no", TypeError),
    ("router_scope", "layer", ValueError), ("q", float("nan"), ValueError),
]
CASES = [(MixLoRAConfig, *case) for case in COMMON + MIXLORA] + [(DynMoLEConfig, *case) for case in COMMON + DYNMOLE]


@pytest.mark.parametrize(("config_cls", "field", "value", "error"), CASES,
                         ids=[f"{c.__name__}-{f}={v!r}" for c, f, v, _ in CASES])
def test_bad_field_is_refused_with_its_name(config_cls, field, value, error):
    with pytest.raises(error) as raised:
        config_cls(num_experts=8, **{field: value}) if field != "num_experts" else config_cls(**{field: value})
    assert re.search(rf"\b{re.escape(field)}\b", str(raised.value)), str(raised.value)  # the field, as a word


@pytest.mark.parametrize("config_cls", [MixLoRAConfig, DynMoLEConfig])
def test_every_field_of_ours_has_a_bad_value_in_the_matrix(config_cls):
    """A field added to a config without a bad value here fails this test (it asserted the lists' own length
    before 2026-12-07, which no change to a config could fail). `base_model_shape` is written by the tuner."""
    import dataclasses

    from peft import PeftConfig

    peft_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    ours = {f.name for f in dataclasses.fields(config_cls)} - peft_fields - {"base_model_shape"}
    covered = {field for cls, field, _, _ in CASES if cls is config_cls}
    assert ours - covered == set() and covered <= ours | peft_fields


@pytest.mark.parametrize(("config_cls", "field", "value"), [
    (MixLoRAConfig, "r", 0), (MixLoRAConfig, "top_k", 9), (DynMoLEConfig, "router_scope", "bogus"),
    (DynMoLEConfig, "q", float("nan")),
], ids=["mixlora-r=0", "mixlora-top_k=9", "dynmole-router_scope", "dynmole-q=nan"])
def test_a_field_changed_after_the_config_was_made_is_checked_when_the_adapter_is_made(config_cls, field, value):
    """`get_peft_model` checks the config again: before, r=0 gave a ZeroDivisionError and an unknown router_scope
    silently built the projection scope."""
    from peft import get_peft_model

    from tests.helpers import tiny_base

    config = config_cls(num_experts=8)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        get_peft_model(tiny_base(), config)


@pytest.mark.parametrize("config_cls", [MixLoRAConfig, DynMoLEConfig])
def test_replace_and_rebuild_derive_target_modules_again(config_cls):
    """`dataclasses.replace` and `cls(**config.to_dict())` pass the old derived target_modules back with new
    lists; a value no derivation gives (a LoRA habit) is refused, whatever the lists (before 2026-12-06, eighteenth
    session, only with both lists as they are: with `attn_target_modules` given, `["q_proj"]` was replaced)."""
    import dataclasses

    config = config_cls(num_experts=4)
    changed = dataclasses.replace(config, attn_target_modules=[])
    assert changed.target_modules == ["down_proj", "gate_proj", "up_proj"]
    settings = {k: v for k, v in config.to_dict().items() if k not in ("peft_type", "peft_version")}
    rebuilt = config_cls(**{**settings, "expert_target_modules": ["up_proj"]})
    assert rebuilt.target_modules == ["k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    with pytest.raises(ValueError, match="target_modules is set from attn_target_modules"):
        config_cls(num_experts=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="target_modules is set from attn_target_modules"):  # lists as they are
        config_cls(num_experts=4, target_modules=["gate_proj", "up_proj", "down_proj"])
    for habit in (["q_proj", "v_proj"], "all-linear", ["q_proj", "gate_proj", "lm_head"]):
        with pytest.raises(ValueError, match="target_modules is set from attn_target_modules"):
            config_cls(num_experts=4, attn_target_modules=["q_proj", "v_proj"], target_modules=habit)
    changed.target_modules = "all-linear"  # set after the config was made: refused when the adapter is made
    with pytest.raises(ValueError, match="target_modules is set from attn_target_modules"):
        get_peft_model(tiny_base(), changed)
