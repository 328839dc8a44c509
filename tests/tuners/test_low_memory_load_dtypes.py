"""`PeftModel.from_pretrained(..., low_cpu_mem_usage=True)` gives what a normal load gives, values and dtypes, on a
half-precision base (a review, 2026-12-08: the attention LoRA was rounded to the base's precision, and without
`autocast_adapter_dtype` the experts kept the file's dtype)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from tests.helpers import METHODS, batch, randomize_adapters, tiny_base


def _dtypes(model) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters() if "mixlora" in name or "dynmole" in name}


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_a_low_memory_load_on_a_bf16_base_is_exact(method, tmp_path):
    """fp32 adapters (PEFT's default `autocast_adapter_dtype=True`) on a bf16 base: the same tensors back."""
    model = get_peft_model(tiny_base().to(torch.bfloat16), METHODS[method]())
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids, mask, _ = batch(2, 6)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, attention_mask=mask).logits
    again = PeftModel.from_pretrained(tiny_base().to(torch.bfloat16), tmp_path, low_cpu_mem_usage=True).eval()
    loaded = dict(again.named_parameters())
    for name, tensor in saved.items():
        assert loaded[name].dtype == tensor.dtype == torch.float32 and torch.equal(loaded[name], tensor), name
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, expected)


def test_without_autocast_a_low_memory_load_gives_a_normal_loads_dtypes(tmp_path):
    """A bf16 file on an fp16 base, `autocast_adapter_dtype=False`: a normal load copies it into fp16 experts and
    LoRA (router fp32); the low-memory load kept bf16 experts beside fp16 attention LoRA."""
    model = get_peft_model(tiny_base().to(torch.bfloat16), METHODS["mixlora"](), autocast_adapter_dtype=False)
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    loads = [PeftModel.from_pretrained(tiny_base().to(torch.float16), tmp_path, low_cpu_mem_usage=low,
                                       autocast_adapter_dtype=False) for low in (False, True)]
    normal, low = (_dtypes(m) for m in loads)
    assert normal == low
    assert {d for n, d in low.items() if "router" in n} == {torch.float32}
    assert {d for n, d in low.items() if "router" not in n} == {torch.float16}
    for (name, a), b in zip(loads[0].named_parameters(), loads[1].parameters(), strict=True):
        assert torch.equal(a, b), name
