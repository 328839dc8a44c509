"""MixLoRA through PEFT's public API: aux loss, training signals, save/load, generation, families."""


import torch
from peft import get_peft_model

from peft_mole import routing
from tests.helpers import batch, mixlora, randomize_adapters, tiny_base


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


def test_return_dict_false_gives_the_dicts_values_as_a_tuple_with_the_aux_loss_and_its_gradient():
    """A tuple's loss is LM loss + aux, as a native MoE model's tuple holds it (before 2026-12-06, eighteenth
    session, the tuple's loss was the LM loss alone: the routers got no load-balance gradient, without a word)."""
    ids, mask, labels = batch(2, 10, pad_last=3)
    gradients = {}
    for coef in (0.5, 0.0):
        model = get_peft_model(tiny_base(), mixlora(router_aux_loss_coef=coef))
        randomize_adapters(model)
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        values = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
        assert isinstance(values, tuple)
        torch.testing.assert_close(values[0], out.loss, rtol=0, atol=0)
        torch.testing.assert_close(values[1], out.logits, rtol=0, atol=0)
        values[0].backward()
        gradients[coef] = [p.grad.clone() for name, p in model.named_parameters() if "router" in name]
    assert out.aux_loss.item() == 0.0 and len(gradients[0.5]) == 2
    # the aux loss's own gradient reaches the routers through the tuple's loss
    assert all((a - b).abs().max() > 1e-5 for a, b in zip(gradients[0.5], gradients[0.0], strict=True))
    model.eval()  # no labels: the model's own tuple (logits, cache)
    assert isinstance(model(input_ids=ids, attention_mask=mask, return_dict=False), tuple)


def test_a_packed_rows_trailing_pads_do_not_count_with_a_name_per_token():
    """A packed row (position ids restarting, no attention mask) ending in pads of position id 0, two adapters named
    per token: each adapter's router loss is that of the row without the pads (the pads counted for the adapter
    whose tokens they followed: the layers see such a row as (T, 1), and its (1, T) mask was dropped)."""
    model = get_peft_model(tiny_base(), mixlora(lora_dropout=0.0), adapter_name="a")
    model.add_adapter("b", mixlora(lora_dropout=0.0))
    randomize_adapters(model)
    model.train()
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]])
    labels = ids.masked_fill(positions == 0, -100)
    padded = model(input_ids=ids, position_ids=positions, labels=labels, adapter_names=["a"] * 5 + ["b"] * 7,
                   use_cache=False)
    cut = model(input_ids=ids[:, :9], position_ids=positions[:, :9], labels=labels[:, :9],
                adapter_names=["a"] * 5 + ["b"] * 4, use_cache=False)
    assert padded.aux_loss_per_adapter.keys() == {"a", "b"}
    for name, value in padded.aux_loss_per_adapter.items():
        torch.testing.assert_close(value, cut.aux_loss_per_adapter[name], rtol=1e-6, atol=0)
