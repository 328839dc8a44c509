"""The adapter lives in the decoder: a vision-language model's vision tower gets no experts and no attention LoRA,
and layers are numbered within the decoder (a review, 2026-12-08); FP8 weights count as quantised."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model

from peft_mole import MixLoRAConfig
from peft_mole.tuners.mixlora.targets import is_quantised

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_llava():
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=28, patch_size=14)
    config = transformers.LlavaConfig(text_config=transformers.LlamaConfig(**TEXT), vision_config=vision)
    return transformers.LlavaForConditionalGeneration(config)


def tiny_qwen25_vl():
    torch.manual_seed(0)
    text = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                  fullatt_block_indexes=[1])
    return transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision))


@pytest.mark.parametrize("make", [tiny_llava, tiny_qwen25_vl], ids=["llava", "qwen2.5-vl"])
def test_a_vision_language_model_is_adapted_in_its_language_model_only(make):
    """Before: the vision blocks' MLPs (Qwen2.5-VL) and the CLIP tower's q/k/v (LLaVA) were adapted, numbered as
    decoder layers, so `layers_to_transform=[2]` on a 2-layer decoder adapted a vision layer alone and no per-layer
    `num_experts` list fitted."""
    model = get_peft_model(make(), MixLoRAConfig(num_experts=[2, 3], top_k=1, r=2))
    targets = model.base_model.__dict__["_targets"]
    assert targets and all(".language_model." in name for name in targets)
    assert {t.layer_index for t in targets.values()} == {0, 1}
    assert sum(t.kind == "mlp" for t in targets.values()) == 2
    with pytest.raises(ValueError, match=r"layers_to_transform=\[2\]"):
        get_peft_model(make(), MixLoRAConfig(num_experts=2, top_k=1, r=2, layers_to_transform=[2]))


def test_fp8_weights_count_as_quantised():
    """A float8 weight (scaled apart, as transformers' FP8Linear) was taken as float: experts made in float8, DoRA
    magnitudes from the unscaled weights."""
    assert is_quantised(torch.zeros(2, 2, dtype=torch.float8_e4m3fn))
    assert not is_quantised(torch.zeros(2, 2, dtype=torch.bfloat16))
