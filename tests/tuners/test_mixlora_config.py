import pytest
from peft import PeftConfig

import peft_mole
from peft_mole import MixLoRAConfig


def test_defaults_follow_the_paper():
    cfg = MixLoRAConfig()
    assert (cfg.num_experts, cfg.top_k, cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 2, 16, 32, 0.05)
    assert cfg.router_aux_loss_coef == 0.01
    assert cfg.expert_target_modules == ["gate_proj", "up_proj", "down_proj"]
    assert cfg.attn_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.peft_type.value == "PEFT_MOLE_MIXLORA" and cfg.task_type == "CAUSAL_LM"
    assert cfg.attention_lora == (16, 32, 0.05)


def test_attention_settings_are_independent():
    cfg = MixLoRAConfig(r=8, attn_r=4, attn_lora_alpha=16, attn_lora_dropout=0.0, attn_target_modules=["q_proj"])
    assert cfg.attention_lora == (4, 16, 0.0)
    assert MixLoRAConfig(attn_target_modules=[]).attn_target_modules == []


def test_rslora_scaling():
    assert MixLoRAConfig(r=16, lora_alpha=32).scaling(16, 32) == 2.0
    assert MixLoRAConfig(r=16, lora_alpha=32, use_rslora=True).scaling(16, 32) == 8.0


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(num_experts=0), ValueError, r"num_experts must be >= 1, got 0"),
        (dict(num_experts=2.5), TypeError, r"num_experts must be an int"),
        (dict(top_k=3, num_experts=2), ValueError, r"top_k must be <= num_experts \(2\), got 3"),
        (dict(top_k=0), ValueError, r"top_k must be >= 1"),
        (dict(r=0), ValueError, r"r must be >= 1, got 0"),
        (dict(r=True), TypeError, r"r must be an int"),
        (dict(lora_alpha=-1), ValueError, r"lora_alpha must be > 0"),
        (dict(lora_alpha=0), ValueError, r"lora_alpha must be > 0\.0, got 0"),  # s = 0: the experts would never learn
        (dict(attn_lora_alpha=0), ValueError, r"attn_lora_alpha must be > 0"),
        (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0.0, 1.0\)"),
        (dict(lora_dropout="0.1"), TypeError, r"lora_dropout must be a number"),
        (dict(expert_target_modules=["gate_proj", "w1"]), ValueError, r"expert_target_modules has unknown.*'w1'.*allowed"),
        (dict(expert_target_modules=[]), ValueError, r"expert_target_modules must name at least one"),
        (dict(expert_target_modules="gate_proj"), TypeError, r"expert_target_modules must be a list"),
        (dict(attn_target_modules=["qkv"]), ValueError, r"attn_target_modules has unknown.*'qkv'"),
        (dict(attn_target_modules=["q_proj", "q_proj"]), ValueError, r"lists a projection twice"),
        (dict(attn_r=0), ValueError, r"attn_r must be >= 1"),
        (dict(attn_lora_dropout=-0.1), ValueError, r"attn_lora_dropout must be in"),
        (dict(router_aux_loss_coef=-0.01), ValueError, r"router_aux_loss_coef must be >= 0"),
        (dict(jitter_noise=1.5), ValueError, r"jitter_noise must be in \[0.0, 1.0\)"),
        (dict(router_init_std=-1), ValueError, r"router_init_std must be >= 0"),
        (dict(use_rslora="yes"), TypeError, r"use_rslora must be a bool"),
        (dict(use_dora=1), TypeError, r"use_dora must be a bool"),
        (dict(layers_to_transform=[0, -1]), ValueError, r"layers_to_transform must hold layer indices >= 0"),
        (dict(bias="all"), ValueError, r"bias must be 'none'"),
    ],
)
def test_bad_values_are_rejected_with_the_field_name(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        MixLoRAConfig(**kwargs)


def test_config_round_trips_through_peft(tmp_path):
    cfg = MixLoRAConfig(num_experts=6, top_k=3, attn_r=4, layers_to_transform=[1])
    cfg.save_pretrained(tmp_path)
    again = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(again, MixLoRAConfig)
    assert again.to_dict() == cfg.to_dict()


def test_registration_fills_every_peft_mapping():
    from peft import PeftType
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    member = PeftType("PEFT_MOLE_MIXLORA")
    assert member is PeftType.PEFT_MOLE_MIXLORA and member in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is MixLoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is peft_mole.MixLoRAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "mixlora_"
    # registering twice is a no-op
    from peft_mole.registration import register_method

    register_method("peft_mole_mixlora", MixLoRAConfig, peft_mole.MixLoRAModel, "mixlora_")
    assert list(PeftType).count(member) == 1
