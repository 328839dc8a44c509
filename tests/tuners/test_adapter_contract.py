"""The PEFT contract every peft-mole adapter type keeps: training signals, save/load, generation, mixing."""

import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_mole.tuners.mixlora.routed import RoutedExpertsLayer
from tests.helpers import FAMILIES, METHODS, batch, randomize_adapters, tiny_base

# every family with MixLoRA and DynMoLE, the other variants on Llama
FAMILY_METHODS = [(f, m) for f in FAMILIES for m in ("mixlora", "dynmole")] + [
    ("llama", m) for m in METHODS if m not in ("mixlora", "dynmole")
]


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_train_and_all_get_gradients(method):
    model = get_peft_model(tiny_base(), METHODS[method]())
    randomize_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefix = model.base_model.prefix
    assert trainable and all(prefix in n for n in trainable)
    assert not any("base_layer" in n or "embed" in n or "lm_head" in n for n in trainable)
    model.train()
    ids, mask, labels = batch(2, 10)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    if method != "mixlora":
        return
    num_experts, r, hidden, inter, layers = 4, 4, 64, 172, 2
    per_layer = num_experts * hidden  # router
    per_layer += 2 * num_experts * r * (hidden + inter) + num_experts * r * (inter + hidden)  # gate, up, down
    per_layer += 4 * r * (hidden + hidden)  # q, k, v, o (4 heads x 16 = 64 both ways)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == layers * per_layer


@pytest.mark.parametrize("method", METHODS)
def test_dropout_is_off_in_eval_and_on_in_train(method):
    model = get_peft_model(tiny_base(), METHODS[method](lora_dropout=0.3))
    randomize_adapters(model)
    ids, mask, _ = batch(2, 8)
    model.eval()
    without = get_peft_model(tiny_base(), METHODS[method](lora_dropout=0.0)).eval()  # the same weights, no dropout
    without.load_state_dict(model.state_dict())
    with torch.no_grad():
        # eval is the model without dropout, bit for bit (a deterministic eval that scaled by 1/(1-p) would not be)
        assert torch.equal(model(input_ids=ids).logits, without(input_ids=ids).logits)
        model.train()
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("method", METHODS)
def test_an_adapter_added_in_eval_mode_does_not_drop_out_until_train(method):
    """`add_adapter` on a model in eval mode gives the new adapter's dropout the model's mode, in layers an earlier
    adapter made and in new ones: two eval forwards agree (before: its x masks followed the new, training-mode
    dropout modules and its down masks the layer, so each eval forward dropped part of the input); `train()` turns
    it on."""
    # the first adapter on layer 0's MLP only: "other" also makes new layers (attention, layer 1)
    model = get_peft_model(tiny_base(), METHODS[method](lora_dropout=0.3, attn_target_modules=[],
                                                         layers_to_transform=[0]))
    model.eval()
    model.add_adapter("other", METHODS[method](lora_dropout=0.3))
    model.set_adapter("other")
    assert any(not m.training for m in model.modules() if "other" in getattr(m, "_modules", {}))
    randomize_adapters(model)
    ids, _, _ = batch(2, 8)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        model.train()
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


_RELOAD_SCRIPT = textwrap.dedent("""
    import json, sys, torch, peft_mole
    from peft import PeftModel
    from peft_mole import synthetic
    for folder, family in json.loads(sys.argv[1]):
        try:
            expected = torch.load(folder + "/expected.pt")
            model = PeftModel.from_pretrained(synthetic.random_model(family, "tiny", seed=0), folder + "/adapter")
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=expected["ids"], attention_mask=expected["mask"]).logits
            equal = torch.equal(logits, expected["logits"])
            print(folder, "bit-exact" if equal else f"differs by {(logits - expected['logits']).abs().max():.3g}")
        except Exception as error:  # noqa: BLE001 - reported by the case's test
            print(folder, f"failed: {type(error).__name__}: {error}")
""")


@pytest.fixture(scope="module")
def saved_and_reloaded(tmp_path_factory) -> dict[tuple[str, str], tuple]:
    """Each (family, method) adapter, randomised and saved with its logits, then loaded by `PeftModel.from_pretrained`
    in one new process for all of them (a process per case cost ~8 s each): {case: (folder, model, result line)}."""
    cases = {}
    for family, method in FAMILY_METHODS:
        folder = tmp_path_factory.mktemp(f"{family}-{method}")
        model = get_peft_model(tiny_base(family), METHODS[method]())
        randomize_adapters(model)
        model.eval()
        ids, mask, _ = batch(2, 9)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        model.save_pretrained(folder / "adapter")
        torch.save({"ids": ids, "mask": mask, "logits": logits}, folder / "expected.pt")
        cases[family, method] = (folder, model)
    argument = json.dumps([[str(folder), family] for (family, _), (folder, _) in cases.items()])
    result = subprocess.run([sys.executable, "-c", _RELOAD_SCRIPT, argument], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith("/"))
    return {case: (folder, model, lines.get(str(folder), "no line printed")) for case, (folder, model) in cases.items()}


@pytest.mark.parametrize("family, method", FAMILY_METHODS)
def test_save_load_round_trip_is_bit_exact_in_a_new_process(saved_and_reloaded, family, method):
    folder, model, reloaded = saved_and_reloaded[family, method]
    assert sorted(p.name for p in (folder / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"
    ]
    peft_type = json.loads((folder / "adapter" / "adapter_config.json").read_text())["peft_type"]
    assert peft_type == model.peft_config["default"].peft_type.value
    saved = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert any(model.base_model.prefix + "router" in k for k in saved) and not any(".default" in k for k in saved)
    assert reloaded == "bit-exact"


@pytest.mark.parametrize("family, method", FAMILY_METHODS)
def test_generation_with_cache_equals_without(family, method):
    model = get_peft_model(tiny_base(family), METHODS[method]())
    randomize_adapters(model, std=0.1)
    model.eval()
    ids, mask, _ = batch(2, 5)
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=mask, pad_token_id=0)
    with_cache = model.generate(input_ids=ids, use_cache=True, **kwargs)
    without = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 13) and torch.equal(with_cache, without)
    with torch.no_grad():
        adapted = model(input_ids=with_cache).logits
        with model.disable_adapter():
            base = model(input_ids=with_cache).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapter takes part in what was generated


@pytest.mark.parametrize("method", METHODS)
def test_generate_accepts_per_row_adapters(method):
    model = get_peft_model(tiny_base(), METHODS[method]())
    model.add_adapter("other", METHODS[method]())
    model.base_model.set_adapter(["default", "other"])
    randomize_adapters(model, std=0.1)
    model.base_model.set_adapter("default")
    model.eval()
    ids, mask, _ = batch(2, 5)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=["default", "other"], **kwargs)
    model.set_adapter("other")
    alone = model.generate(input_ids=ids[1:], attention_mask=mask[1:], **kwargs)
    assert torch.equal(mixed[1:], alone)
    model.set_adapter("default")  # and row 0 as "default" alone (every row taking the last adapter would pass above)
    first = model.generate(input_ids=ids[:1], attention_mask=mask[:1], **kwargs)
    as_other = model.generate(input_ids=ids[:1], attention_mask=mask[:1], adapter_names=["other"], **kwargs)
    assert torch.equal(mixed[:1], first) and not torch.equal(first, as_other)  # (the adapters generate apart)


@pytest.mark.parametrize("method", METHODS)
def test_merge_is_refused_and_unload_restores_the_base(method):
    base = tiny_base()
    ids, _, _ = batch(1, 6)
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model = get_peft_model(base, METHODS[method]())
    randomize_adapters(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="add_weighted_adapter is not supported"):
        model.add_weighted_adapter(["default"], [1.0], "sum")
    with pytest.warns(UserWarning, match="Already unmerged"):  # as PEFT's LoRA layers, not a bare NotImplementedError
        model.unmerge_adapter()
    config = pickle.loads(pickle.dumps(model.peft_config["default"]))  # attached to a tuner, it still pickles
    assert config.to_dict() == model.peft_config["default"].to_dict()
    restored = model.unload()
    assert not any(isinstance(m, RoutedExpertsLayer) for m in restored.modules())
    with torch.no_grad():
        assert torch.equal(restored(input_ids=ids).logits, reference)


@pytest.mark.parametrize("method", METHODS)
def test_delete_adapter_removes_its_weights(method):
    model = get_peft_model(tiny_base(), METHODS[method]())
    model.add_adapter("other", METHODS[method]())
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert list(model.peft_config) == ["default"]
    ids, mask, labels = batch(2, 5)
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


@pytest.mark.parametrize("method", METHODS)
def test_load_onto_other_base_is_refused(method, tmp_path):
    model = get_peft_model(tiny_base(), METHODS[method]())
    model.save_pretrained(tmp_path)
    wider = tiny_base(hidden_size=32, intermediate_size=86)
    with pytest.raises(ValueError, match=r"trained on a base with hidden_size 64 \(this base: 32\)"):
        PeftModel.from_pretrained(wider, tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_an_adapter_copied_by_parameter_name_as_trl_does_is_exact_and_saved_keys_keep_their_format(method, tmp_path):
    """TRL's DPO/KTO/GRPO/RLOO trainers copy a loaded adapter into a frozen "ref" adapter by replacing ".default." in
    parameter names; the attention LoRA's were named `...q_proj.mixlora_A.default` and were left out (the reference
    kept an untrained attention LoRA: 0.39 off in the probe). Saved files keep the keys `...q_proj.mixlora_A`."""
    model = get_peft_model(tiny_base(), METHODS[method]())
    randomize_adapters(model, std=0.1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "dynmole" if method.startswith("dynmole") else "mixlora"
    assert f"base_model.model.model.layers.0.self_attn.q_proj.{prefix}_A" in saved
    assert not any(k.endswith("_A.weight") or ".default" in k for k in saved)
    loaded = PeftModel.from_pretrained(tiny_base(), tmp_path, is_trainable=True)
    loaded.add_adapter("ref", loaded.peft_config["default"])
    with torch.no_grad():
        for name, param in loaded.named_parameters():
            if ".default." in name:
                loaded.get_parameter(name.replace(".default.", ".ref.")).copy_(param)
    loaded.eval()
    ids, mask, _ = batch(2, 6)
    with torch.no_grad():
        policy = loaded(input_ids=ids, attention_mask=mask).logits
        loaded.set_adapter("ref")
        reference = loaded(input_ids=ids, attention_mask=mask).logits
        model.eval()
        torch.testing.assert_close(policy, model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    torch.testing.assert_close(reference, policy, atol=0, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_modules_to_save_are_trained_and_saved(method, tmp_path):
    model = get_peft_model(tiny_base(), METHODS[method](modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save.default" in n for n in trainable)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("lm_head.weight") for k in saved)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_adapter_batch_equals_each_row_alone(method):
    from peft_mole import BASE_ROW

    model = get_peft_model(tiny_base(), METHODS[method]())
    model.add_adapter("other", METHODS[method](num_experts=3, r=2, attn_target_modules=["q_proj", "v_proj"]))
    model.base_model.set_adapter(["default", "other"])  # make both trainable so randomisation reaches both
    randomize_adapters(model, std=0.1)
    model.base_model.set_adapter("default")
    model.eval()
    ids, mask, _ = batch(4, 9)
    names = ["other", "default", BASE_ROW, "other"]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == BASE_ROW:
                with model.disable_adapter():
                    alone = model(input_ids=ids[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3  # the adapters really differ


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_mixed_adapter_batch_runs_each_rows_own_modules_to_save_copy(method):
    """Each row's own copy of a `modules_to_save` module (the frozen original for "__base__"), as PEFT's LoRA does,
    in forward, through the tuner directly and in generate (before: every row used the active adapter's copy). An
    adapter without a copy runs the original, as alone (before, and with PEFT's LoRA: a KeyError)."""
    from peft_mole import BASE_ROW

    model = get_peft_model(tiny_base(), METHODS[method](modules_to_save=["lm_head"]))
    model.add_adapter("other", METHODS[method](modules_to_save=["lm_head"]))
    model.add_adapter("plain", METHODS[method]())
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for name, p in sorted(model.named_parameters()):
            if "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    model.eval()
    ids, mask, _ = batch(4, 7)
    names = ["other", BASE_ROW, "default", "plain"]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        direct = model.base_model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == BASE_ROW:
                with model.disable_adapter():
                    alone = model(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(direct[row : row + 1], alone, atol=1e-5, rtol=1e-5)
    assert (mixed[0] - mixed[2]).abs().max() > 1.0  # the lm_head copies really differ
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    generated = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs)
    model.set_adapter("other")
    assert torch.equal(generated[:1], model.generate(input_ids=ids[:1], attention_mask=mask[:1], **kwargs))
    model.set_adapter("plain")
    assert torch.equal(generated[3:], model.generate(input_ids=ids[3:], attention_mask=mask[3:], **kwargs))


def test_the_reserved_base_row_name_cannot_name_an_adapter():
    from peft_mole import BASE_ROW

    with pytest.raises(ValueError, match="'__base__' is reserved"):
        get_peft_model(tiny_base(), METHODS["mixlora"](), adapter_name=BASE_ROW)
    model = get_peft_model(tiny_base(), METHODS["mixlora"]())
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        model.add_adapter(BASE_ROW, METHODS["mixlora"]())


@pytest.mark.parametrize("method", METHODS)
def test_low_cpu_mem_usage_loading_matches_and_keeps_routers_fp32(method, tmp_path):
    model = get_peft_model(tiny_base(), METHODS[method]())
    randomize_adapters(model)
    model.eval()
    ids, mask, _ = batch(2, 6)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tiny_base(), tmp_path, low_cpu_mem_usage=True).eval()
    routers = [p for n, p in again.named_parameters() if "router" in n]
    assert routers and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in routers)
    with torch.no_grad():
        # same values; a meta-device load may lay tensors out differently, so allow float rounding (seen: 3e-8)
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)


def two_mixlora_adapters():
    """A MixLoRA model in eval mode with adapters "default" (active) and "other", both random; a batch of 2 × 5."""
    model = get_peft_model(tiny_base(), METHODS["mixlora"]())
    model.add_adapter("other", METHODS["mixlora"]())
    model.base_model.set_adapter(["default", "other"])
    randomize_adapters(model, std=0.1)
    model.base_model.set_adapter("default")
    model.eval()
    ids, mask, _ = batch(2, 5)
    return model, ids, mask


def test_generate_with_beams_and_per_row_adapters_and_no_stale_rows():
    model, ids, mask = two_mixlora_adapters()
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=3)
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=["default", "other"], **kwargs)
    model.set_adapter("other")
    alone = model.generate(input_ids=ids[1:], attention_mask=mask[1:], **kwargs)
    assert torch.equal(mixed[1:], alone)
    model.set_adapter("default")  # and row 0 as "default" alone (every row taking the last adapter would pass above)
    first = model.generate(input_ids=ids[:1], attention_mask=mask[:1], **kwargs)
    as_other = model.generate(input_ids=ids[:1], attention_mask=mask[:1], adapter_names=["other"], **kwargs)
    assert torch.equal(mixed[:1], first) and not torch.equal(first, as_other)  # (the adapters generate apart)
    model.set_adapter("other")
    # the rows given to generate do not leak into a later direct call with another batch size: it runs the active
    # adapter ("other") on its one row, as a fresh forward of that adapter does
    with torch.no_grad():
        later = model.get_base_model()(input_ids=ids[:1]).logits
        fresh = model(input_ids=ids[:1]).logits
        default = model(input_ids=ids[:1], adapter_names=["default"]).logits
    torch.testing.assert_close(later, fresh, atol=0, rtol=0)
    assert (later - default).abs().max() > 1e-4  # not the first row's adapter of the generate call
    # nor the rows of a mixed forward, whatever the batch size (before: kept, or a ValueError about adapter_names)
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["default", "default"])
        two = model.get_base_model()(input_ids=ids).logits
        model(input_ids=ids, adapter_names=["default", "default"])
        one = model.get_base_model()(input_ids=ids[:1]).logits
    torch.testing.assert_close(one, fresh, atol=0, rtol=0)
    torch.testing.assert_close(two, model(input_ids=ids).logits, atol=0, rtol=0)


def test_generate_with_per_row_adapters_takes_beams_and_returned_sequences_from_a_generation_config():
    from transformers import GenerationConfig

    model, ids, mask = two_mixlora_adapters()
    config = GenerationConfig(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0, num_beams=3,
                              num_return_sequences=2)
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=["default", "other"],
                           generation_config=config)  # before: "adapter_names has 2 entries but the batch has 6 rows"
    assert mixed.shape[0] == 4
    positional = model.generate(ids, config, attention_mask=mask, adapter_names=["default", "other"])
    assert torch.equal(positional, mixed)  # transformers' order: generate(inputs, generation_config) (before
    model.set_adapter("other")  # 2026-12-06: "adapter_names has 2 entries but the batch has 6 rows")
    assert torch.equal(mixed[2:], model.generate(input_ids=ids[1:], attention_mask=mask[1:], generation_config=config))
    model.set_adapter("default")
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0, num_beams=2)
    by_keywords = model.generate(input_ids=ids, attention_mask=mask, adapter_names=["other", "default"],
                                 num_return_sequences=2, **kwargs)
    assert torch.equal(by_keywords[2:], model.generate(input_ids=ids[1:], attention_mask=mask[1:],
                                                       num_return_sequences=2, **kwargs))


def test_the_decoder_called_alone_after_a_mixed_call_runs_the_active_adapter_on_every_row():
    model, ids, mask = two_mixlora_adapters()
    decoder = model.get_base_model().get_decoder()
    with torch.no_grad():
        expected = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        model(input_ids=ids, attention_mask=mask, adapter_names=["other", "__base__"])
        after = decoder(input_ids=ids, attention_mask=mask).last_hidden_state  # before: the mixed call's rows
        model(input_ids=ids, attention_mask=mask, adapter_names=["other", "__base__"])
        doubled = decoder(input_ids=torch.cat([ids, ids])).last_hidden_state  # before: a ValueError on 4 rows
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                       adapter_names=["other", "__base__"])
        after_generate = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(after, expected, atol=0, rtol=0)
    torch.testing.assert_close(after_generate, expected, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(doubled[:2], decoder(input_ids=ids).last_hidden_state, atol=1e-5, rtol=0)
    # unload() removes both hooks: the decoder is the base's own again
    model.base_model.unload()
    assert not decoder._forward_pre_hooks and not model.get_base_model()._forward_pre_hooks


def test_a_compiled_base_called_after_a_mixed_call_runs_the_active_adapter():
    model, ids, mask = two_mixlora_adapters()
    base = model.get_base_model()
    compiled = torch.compile(base, backend="eager")
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
        model(input_ids=ids, attention_mask=mask, adapter_names=["other", "__base__"])
        after = compiled(input_ids=ids, attention_mask=mask).logits  # (a review found the previous call's rows)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)


def test_router_stats_keep_each_adapters_latest_forward_and_forget_a_deleted_adapter(tmp_path):
    model, ids, mask = two_mixlora_adapters()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, labels=ids, adapter_names=["other", "other"])
        model(input_ids=ids, attention_mask=mask, labels=ids)  # "default"
    assert {adapter for adapter, _ in model.base_model.router_stats()} == {"default", "other"}
    model.delete_adapter("other")
    assert {adapter for adapter, _ in model.base_model.router_stats()} == {"default"}  # (was a KeyError)
    model.save_pretrained(tmp_path)  # its model card reads the router statistics
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_reentrant_checkpointing_is_refused_instead_of_silently_dropping_the_aux_loss():
    base = tiny_base()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    base.enable_input_require_grads()
    model = get_peft_model(base, METHODS["mixlora"]())
    model.train()
    ids, mask, labels = batch(2, 6)
    with pytest.raises(ValueError, match="use_reentrant': False"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


def test_offloaded_mlp_weights_are_refused():
    with torch.device("meta"):
        base = tiny_base()
    with pytest.raises(ValueError, match="meta device"):
        get_peft_model(base, METHODS["mixlora"]())


@pytest.mark.parametrize(
    "config", [METHODS["dynmole"], lambda: METHODS["mixlora"](top_k=3)], ids=["dynmole", "top3of4"]
)
def test_generate_and_base_calls_after_a_shorter_forward_use_their_own_token_mask(config):
    # rules that count real tokens to choose the dense path read the call's mask: generate and direct base calls
    # do not pass through the tuner's forward, and took the mask of the forward before (a shape error; 12 vs 6)
    model = get_peft_model(tiny_base(), config())
    randomize_adapters(model, std=0.1)
    model.eval()
    ids, mask, _ = batch(2, 6)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    fresh = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        model(input_ids=ids[:, :3], attention_mask=mask[:, :3])
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kwargs), fresh)
        model(input_ids=ids[:, :3], attention_mask=mask[:, :3])
        direct = model.get_base_model()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(direct, expected, atol=0, rtol=0)
