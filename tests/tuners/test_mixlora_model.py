"""MixLoRA through PEFT's public API: aux loss, training signals, save/load, generation, families."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_mole import routing
from peft_mole.tuners.mixlora import MixLoRAMLP
from tests.helpers import FAMILIES, batch, mixlora, randomize_adapters, tiny_base


def test_loss_is_lm_loss_plus_coef_times_mean_layer_load_balance():
    model = get_peft_model(tiny_base(), mixlora(router_aux_loss_coef=0.5))
    randomize_adapters(model)
    model.train()
    ids, mask, labels = batch(2, 10, pad_last=3)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    # recompute: LM loss with the adapter, router statistics by hand
    records = []
    context = model.base_model._context()
    context.set_row_adapters(None)
    context.token_mask, context.records = mask.bool(), records
    lm = model.base_model.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    context.records = None
    layers = [routing.load_balance_loss(*r.counted()) for r in records]
    assert len(layers) == 2
    assert all(r.counted()[0].shape[0] == int(mask.sum()) for r in records)
    expected_aux = 0.5 * torch.stack(layers).mean()
    torch.testing.assert_close(out.aux_loss, expected_aux)
    torch.testing.assert_close(out.loss, lm + expected_aux)


def test_aux_loss_follows_num_items_in_batch_for_gradient_accumulation():
    model = get_peft_model(tiny_base(), mixlora())
    model.train()
    ids, mask, labels = batch(2, 10)
    n = int((labels[:, 1:] != -100).sum())
    plain = model(input_ids=ids, attention_mask=mask, labels=labels)
    scaled = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(4 * n))
    lm_plain, lm_scaled = plain.loss - plain.aux_loss, scaled.loss - scaled.aux_loss / 4
    torch.testing.assert_close(lm_scaled * 4, lm_plain, atol=1e-5, rtol=1e-5)


def test_no_router_state_in_eval_without_labels_and_no_carry_over():
    model = get_peft_model(tiny_base(), mixlora())
    model.eval()
    ids, mask, labels = batch(2, 6)
    out = model(input_ids=ids, attention_mask=mask)
    assert "aux_loss" not in out
    assert model.base_model._context().records is None
    out1 = model(input_ids=ids, attention_mask=mask, labels=labels)
    out2 = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out1.aux_loss, out2.aux_loss)  # second call does not see the first's records


def test_only_adapter_parameters_train_and_all_get_gradients():
    model = get_peft_model(tiny_base(), mixlora())
    randomize_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("mixlora_" in n for n in trainable)
    assert not any("base_layer" in n or "embed" in n or "lm_head" in n for n in trainable)
    model.train()
    ids, mask, labels = batch(2, 10)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    num_experts, r, hidden, inter, layers = 4, 4, 64, 172, 2
    per_layer = num_experts * hidden  # router
    per_layer += 2 * num_experts * r * (hidden + inter) + num_experts * r * (inter + hidden)  # gate, up, down
    per_layer += 4 * r * (hidden + hidden)  # q, k, v, o (4 heads x 16 = 64 both ways)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == layers * per_layer


def test_dropout_is_off_in_eval_and_on_in_train():
    model = get_peft_model(tiny_base(), mixlora(lora_dropout=0.3))
    randomize_adapters(model)
    ids, mask, _ = batch(2, 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        model.train()
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_is_bit_exact_in_a_new_process(family, tmp_path):
    model = get_peft_model(tiny_base(family), mixlora())
    randomize_adapters(model)
    model.eval()
    ids, mask, _ = batch(2, 9)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"
    ]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "PEFT_MOLE_MIXLORA"
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("mixlora_router" in k for k in saved) and not any(".default" in k for k in saved)
    torch.save({"ids": ids, "mask": mask, "logits": logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch, peft_mole
        from peft import PeftModel, AutoPeftModelForCausalLM
        from peft_mole import synthetic
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        base = synthetic.random_model({family!r}, "tiny", seed=0)
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=expected["ids"], attention_mask=expected["mask"]).logits
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        print("bit-exact")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bit-exact" in result.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_cache_equals_without(family):
    model = get_peft_model(tiny_base(family), mixlora())
    randomize_adapters(model, std=0.1)
    model.eval()
    ids, mask, _ = batch(2, 5)
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=mask, pad_token_id=0)
    with_cache = model.generate(input_ids=ids, use_cache=True, **kwargs)
    without = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 13) and torch.equal(with_cache, without)
    with model.disable_adapter():
        base_tokens = model.generate(input_ids=ids, use_cache=True, **kwargs)
    assert not torch.equal(base_tokens, with_cache)  # the adapter changes what is generated


def test_generate_accepts_per_row_adapters():
    model = get_peft_model(tiny_base(), mixlora())
    model.add_adapter("other", mixlora())
    model.base_model.set_adapter(["default", "other"])
    randomize_adapters(model, std=0.1)
    model.base_model.set_adapter("default")
    model.eval()
    ids, mask, _ = batch(2, 5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=["default", "other"], **kwargs)
    model.set_adapter("other")
    alone = model.generate(input_ids=ids[1:], attention_mask=mask[1:], **kwargs)
    assert torch.equal(mixed[1:], alone)


def test_merge_is_refused_and_unload_restores_the_base():
    base = tiny_base()
    ids, _, _ = batch(1, 6)
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model = get_peft_model(base, mixlora())
    randomize_adapters(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    restored = model.unload()
    assert not any(isinstance(m, MixLoRAMLP) for m in restored.modules())
    with torch.no_grad():
        assert torch.equal(restored(input_ids=ids).logits, reference)


def test_delete_adapter_removes_its_weights():
    model = get_peft_model(tiny_base(), mixlora())
    model.add_adapter("other", mixlora())
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert list(model.peft_config) == ["default"]
    ids, mask, labels = batch(2, 5)
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def test_load_onto_other_base_is_refused(tmp_path):
    model = get_peft_model(tiny_base(), mixlora())
    model.save_pretrained(tmp_path)
    wider = tiny_base(hidden_size=32, intermediate_size=86)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(wider, tmp_path)


def test_modules_to_save_are_trained_and_saved(tmp_path):
    model = get_peft_model(tiny_base(), mixlora(modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save.default" in n for n in trainable)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("lm_head.weight") for k in saved)
