"""MixDoRA's expert row norms ‖W + s·B_e A_e‖_row under PEFT's `DoraCaching()`: kept between calls in eval mode,
recomputed when A, B or W change or the model trains, never kept outside the context."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from peft.helpers import DoraCaching

from tests.helpers import batch, compile_config, count_row_norms, mixlora, randomize_adapters, tiny_base


@pytest.fixture
def norm_calls(monkeypatch):
    return count_row_norms(monkeypatch)


def dora_model():
    model = get_peft_model(tiny_base(), mixlora(use_dora=True))
    randomize_adapters(model, std=0.2)
    return model.eval()


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


PROJECTIONS = 2 * 3  # two layers × gate/up/down


def test_norms_are_kept_inside_dora_caching_in_eval_mode(norm_calls):
    model = dora_model()
    ids, mask, _ = batch(2, 6)
    uncached = logits(model, ids, mask)
    assert len(norm_calls) == PROJECTIONS
    norm_calls.clear()
    with DoraCaching():
        first, second = logits(model, ids, mask), logits(model, ids, mask)
    assert len(norm_calls) == PROJECTIONS  # the second forward reused every projection's norms
    assert torch.equal(first, uncached) and torch.equal(second, uncached)
    norm_calls.clear()
    logits(model, ids, mask)  # outside the context: computed again
    assert len(norm_calls) == PROJECTIONS


def test_an_adapter_made_under_inference_mode_keeps_its_norms_too(norm_calls):
    # inference tensors have no version counter (before: a RuntimeError from reading it)
    ids, mask, _ = batch(2, 6)
    with torch.inference_mode():
        model = dora_model()
        uncached = model(input_ids=ids, attention_mask=mask).logits
        norm_calls.clear()
        with DoraCaching():
            first, second = (model(input_ids=ids, attention_mask=mask).logits for _ in range(2))
    assert len(norm_calls) == PROJECTIONS
    assert torch.equal(first, uncached) and torch.equal(second, uncached)


def test_a_changed_factor_or_training_recomputes_the_norms(norm_calls):
    model = dora_model()
    ids, mask, labels = batch(2, 6)
    with DoraCaching():
        logits(model, ids, mask)
        lora_b = next(p for n, p in model.named_parameters() if n.endswith("up_proj_lora_B"))
        with torch.no_grad():
            lora_b.mul_(3.0)  # in place, as an optimizer step: one projection of one layer changed
        norm_calls.clear()
        changed = logits(model, ids, mask)
        assert len(norm_calls) == 1
        model.train()
        norm_calls.clear()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        assert len(norm_calls) == PROJECTIONS  # training mode never reads the cache
        model.eval()
    assert torch.equal(changed, logits(model, ids, mask))  # the cached result was the fresh one


def test_compiled_decoding_inside_dora_caching_uses_the_fresh_norms():
    """`generate`'s eager prefill refreshes the entries that the compiled decoding steps read, also after an
    in-place change of the factors."""
    model = dora_model()
    ids = torch.randint(3, 500, (2, 6), generator=torch.Generator().manual_seed(0))
    config = compile_config("eager")

    def generate(compiled: bool):
        extra = {"cache_implementation": "static", "compile_config": config} if compiled else {}
        with torch.no_grad(), DoraCaching():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                 min_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                                 output_logits=True, **extra)
        return out.sequences, torch.stack(out.logits)

    for step in range(2):
        if step:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.mul_(4.0)
        eager_tokens, eager_logits = generate(False)
        tokens, logits = generate(True)
        torch.testing.assert_close(logits, eager_logits, atol=2e-5, rtol=2e-5)
        assert torch.equal(tokens, eager_tokens)
        if step == 0:
            before = eager_logits
    assert (eager_logits - before).abs().max() > 1e-2  # the change mattered
