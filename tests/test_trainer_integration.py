"""Plain transformers.Trainer and TRL SFTTrainer train MixLoRA with no special trainer."""

import pytest
import torch
from datasets import load_dataset
from peft import get_peft_model
from transformers import AutoTokenizer, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from peft_mole import synthetic
from tests.helpers import METHODS, batch, randomize_adapters, tiny_base


@pytest.fixture(scope="module")
def local_assets(tmp_path_factory):
    """Tokenizer and dataset written to disk and loaded back with the real loaders."""
    root = tmp_path_factory.mktemp("assets")
    synthetic.demo_tokenizer(save_dir=root / "tokenizer")
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in synthetic.multitask_rows(96)]
    synthetic.write_jsonl(rows, root / "train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    dataset = load_dataset("json", data_files=str(root / "train.jsonl"), split="train")
    return tokenizer, dataset


def sft_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=5e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_length=48, seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return SFTConfig(**settings)


@pytest.mark.parametrize("method", METHODS)
def test_sft_trainer_with_peft_config_trains_and_loss_goes_down(method, local_assets, tmp_path):
    tokenizer, dataset = local_assets
    base = tiny_base(vocab_size=len(tokenizer))
    config = METHODS[method](r=8, lora_alpha=16)
    trainer = SFTTrainer(
        model=base, args=sft_args(tmp_path), train_dataset=dataset, processing_class=tokenizer, peft_config=config,
    )
    assert type(trainer.model.base_model).__name__ in ("MixLoRAModel", "DynMoLEModel")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert all(h["aux_loss"] > 0 for h in trainer.state.log_history if "loss" in h)  # TRL logs the router aux loss
    for name, p in trainer.model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == p.requires_grad, name  # adapters moved, the base did not


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_sft_trainer_loss_includes_the_router_aux_loss(method, loss_type, local_assets, tmp_path):
    """SFTTrainer adds `outputs.aux_loss` to its LM loss as it does a Mixture-of-Experts model's (the adapter
    declares it in the base's config), for both loss types, and the fused head's log-probabilities stay the
    model's. Before, the aux loss was subtracted from every target token's log-probability: under DFT, which
    weights each token's term by its probability, it all but vanished (router gradient about 300x too small)."""
    tokenizer, dataset = local_assets
    base = tiny_base(vocab_size=len(tokenizer))
    big = dict(router_aux_loss_coef=0.7) if method == "mixlora" else dict(entropy_loss_coef=0.7)
    config = METHODS[method](r=8, **big)
    trainer = SFTTrainer(
        model=base, args=sft_args(tmp_path, gradient_checkpointing=False, loss_type=loss_type), train_dataset=dataset,
        processing_class=tokenizer, peft_config=config,
    )
    assert trainer.aux_loss_enabled
    inputs = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()
    loss = trainer.compute_loss(model, dict(inputs))
    out = model(**inputs)  # the model's own loss: LM loss (logits path) + aux
    assert out.aux_loss > 0.5  # 0.7 x load balance (≥ 1 - a bit with random routing) is not negligible
    labels = inputs["labels"][:, 1:]
    target = labels != -100
    log_probs = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    per_token = -log_probs * (log_probs.exp() if loss_type == "dft" else 1.0)
    lm_only = per_token[target].sum() / target.sum()
    torch.testing.assert_close(loss, lm_only + out.aux_loss, atol=1e-5, rtol=1e-5)
    if loss_type == "nll":
        torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    fused = model(**inputs, fused_lm_head=True, use_cache=False)
    torch.testing.assert_close(fused.log_probs[target], log_probs[target], atol=1e-5, rtol=1e-5)
    (router_grad,) = torch.autograd.grad(loss, [p for n, p in model.named_parameters() if "router" in n][:1])
    (lm_grad,) = torch.autograd.grad(lm_only, [p for n, p in model.named_parameters() if "router" in n][:1])
    assert (router_grad - lm_grad).norm() > 0.1 * router_grad.norm()  # the aux loss reaches the routers
    off = SFTTrainer(model=model, args=sft_args(tmp_path, router_aux_loss_coef=0.0, loss_type=loss_type),
                     train_dataset=dataset, processing_class=tokenizer)
    torch.testing.assert_close(off.compute_loss(model, dict(inputs)), lm_only, atol=1e-5, rtol=1e-5)
    # the next trainer's default (None) is the adapter's weight 1.0 again, not the last trainer's 0.0 (before
    # 2026-12-06: TRL's copy in the base config stayed, and SFTTrainer, DPO, KTO, GRPO read it as their default)
    default = SFTTrainer(model=model, args=sft_args(tmp_path, loss_type=loss_type), train_dataset=dataset,
                         processing_class=tokenizer)
    assert default.aux_loss_enabled and default.router_aux_loss_coef == 1.0
    torch.testing.assert_close(default.compute_loss(model, dict(inputs)), loss, atol=1e-5, rtol=1e-5)


def test_unload_leaves_the_base_config_as_it_was(local_assets):
    """The router aux loss is declared to TRL in the base's config (`output_router_logits`,
    `router_aux_loss_coef`); `unload()` gives the base back without them."""
    base = tiny_base()
    before = base.config.to_dict()
    model = get_peft_model(base, METHODS["mixlora"]())
    assert base.config.router_aux_loss_coef == 1.0 and base.config.output_router_logits is False
    ids, mask, _ = batch(2, 6)
    model(input_ids=ids, attention_mask=mask, output_router_logits=True)  # TRL's keyword: taken, not passed on
    assert model.unload().config.to_dict() == before


def test_two_models_on_one_config_both_declare_the_aux_loss_to_trl(local_assets, tmp_path):
    """Two bases built from one config object share it: the second model's tuner must not take the attributes the
    first one's wrote for a native MoE base's (TRL then asked it for router logits and failed in Mixtral's loss);
    both train with the aux loss under SFTTrainer, and the config loses the attributes when the last tuner unloads."""
    tokenizer, dataset = local_assets
    first = tiny_base(vocab_size=len(tokenizer))
    before = first.config.to_dict()
    second = type(first)(first.config)
    assert second.config is first.config
    models = [get_peft_model(base, METHODS["mixlora"]()) for base in (first, second)]
    for model in models:
        trainer = SFTTrainer(model=model, args=sft_args(tmp_path, max_steps=2), train_dataset=dataset,
                             processing_class=tokenizer)
        trainer.train()
        assert trainer.aux_loss_enabled and [h["aux_loss"] for h in trainer.state.log_history if "aux_loss" in h]
    models[0].unload()
    assert first.config.output_router_logits is False and first.config.router_aux_loss_coef == 1.0  # still used
    assert first.config.keys_to_ignore_at_inference[-2:] == ["aux_loss", "aux_loss_per_adapter"]
    models[1].unload()
    after = first.config.to_dict()
    assert after.pop("use_cache") is False and before.pop("use_cache") is True  # (SFTTrainer's own change)
    assert after == before


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_trainer_predictions_are_the_logits_as_with_peft_lora(method, tmp_path):
    """`Trainer.predict/evaluate` give `compute_metrics` every output but the loss: the aux loss fields are left
    out as a config's `keys_to_ignore_at_inference` (before: a tuple of logits and aux losses, which the usual
    `np.argmax(logits, -1)` metric cannot take)."""
    model = get_peft_model(tiny_base(), METHODS[method]())
    randomize_adapters(model)
    ids = torch.randint(3, 500, (4, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=2)
    predictions = Trainer(model=model, args=args).predict(rows).predictions
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    assert predictions.shape == (4, 12, logits.shape[-1])
    torch.testing.assert_close(torch.from_numpy(predictions), logits, atol=1e-5, rtol=1e-5)
    assert "keys_to_ignore_at_inference" not in model.unload().config.to_dict()  # gone with the adapters


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(method):
    ids, mask, labels = batch(2, 10, pad_last=2)
    grads = []
    for checkpointing in (False, True):
        base = tiny_base()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        model = get_peft_model(base, METHODS[method]())
        randomize_adapters(model)
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5, msg=name)


def test_plain_trainer_with_gradient_accumulation(local_assets, tmp_path):
    tokenizer, _ = local_assets
    model = get_peft_model(tiny_base(vocab_size=len(tokenizer)), METHODS["mixlora"]())
    ids = torch.randint(3, len(tokenizer), (16, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reaches our forward
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", METHODS)
def test_sft_trainer_padding_free_trains_as_padded(method, local_assets, tmp_path):
    """TRL's padding_free=True (rows packed into one, position ids restarting): the experts, the router losses and
    the LM loss see each sequence as in a padded batch, so the adapter ends as with padding. Also with
    `pad_to_multiple_of`, whose pads (position 0, no attention mask) do not count in the router losses
    (`forward_context.packed_real_tokens`; before, they did: gradients off by 1.5e-2)."""
    tokenizer, dataset = local_assets
    trained = {}
    for padding_free, multiple in ((False, None), (True, None), (True, 64)):
        model = get_peft_model(tiny_base(vocab_size=len(tokenizer)), METHODS[method](r=8, lora_alpha=16))
        randomize_adapters(model)
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        # fp32 (bf16 autocast rounds the two layouts differently) and SGD (Adam's first steps turn float noise in
        # near-zero gradients into lr-sized moves)
        args = sft_args(tmp_path, max_steps=3, padding_free=padding_free, max_length=None, bf16=False, optim="sgd",
                        learning_rate=0.5, pad_to_multiple_of=multiple)
        trainer = SFTTrainer(model=model, train_dataset=dataset, processing_class=tokenizer, args=args)
        if padding_free:
            first = next(iter(trainer.get_train_dataloader()))
            assert "attention_mask" not in first
            assert (first["position_ids"][0, -2:] == 0).all() == (multiple is not None)  # trailing pads
        trainer.train()
        trained[padding_free, multiple] = {n: p.detach().clone() for n, p in model.named_parameters()
                                           if p.requires_grad}
    padded = trained[False, None]
    assert max((padded[n] - initial[n]).abs().max().item() for n in initial) > 1e-3
    for layout in ((True, None), (True, 64)):
        for name, value in trained[layout].items():
            torch.testing.assert_close(value, padded[name], atol=1e-5, rtol=0, msg=(layout, name))


def test_on_a_native_moe_base_trl_adds_the_adapters_aux_loss_at_weight_one():
    """A Qwen2-MoE base returns its own router loss L_base and TRL adds c · aux_loss (c: the base's
    router_aux_loss_coef). The adapter's aux loss joins as aux_loss = L_base + aux / c, so TRL adds c · L_base + aux
    (before this session's change it was shifted into the log-probs; with the first version of the declaration it
    was scaled by c = 0.001 and L_base dropped)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    config = Qwen2MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    base = Qwen2MoeForCausalLM(config)
    model = get_peft_model(base, METHODS["mixlora"](num_experts=4, r=4, router_aux_loss_coef=0.5))
    assert "_declared_aux_config" not in model.base_model.__dict__  # a native MoE config is left as it is
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
    base.config.output_router_logits = True  # as SFTTrainer sets it
    model.train()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids, output_router_logits=True, fused_lm_head=True)
    ours = out.aux_loss_per_adapter["default"]
    with model.disable_adapter():
        native = model(input_ids=ids, labels=ids, output_router_logits=True, fused_lm_head=True).aux_loss
    coef = base.config.router_aux_loss_coef
    assert ours > 0.4 and native is not None
    torch.testing.assert_close(coef * out.aux_loss, coef * native + ours, rtol=1e-4, atol=1e-5)
    # a trainer's own coefficient c' (SFTTrainer writes it into the config, DPO keeps it): c' · aux_loss adds
    # c' · L_base + (c'/c) · aux in both (before 2026-12-08 the config's c' was read back: weight 1 whatever c')
    base.config.router_aux_loss_coef = 10 * coef
    again = model(input_ids=ids, labels=ids, output_router_logits=True, fused_lm_head=True)
    torch.testing.assert_close(10 * coef * again.aux_loss, 10 * coef * native + 10 * ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_dpo_trainer_copies_a_loaded_adapter_into_its_reference_exactly(method, local_assets, tmp_path):
    """SFT, then DPO from the saved adapter: TRL's DPOTrainer (no ref_model given) adds a "ref" adapter and copies
    the policy's parameters into it by name. Before, the attention LoRA was not copied (probe: the reference was
    0.39 off the policy at step 0, so DPO's rewards did not start at 0)."""
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    tokenizer, dataset = local_assets
    sft = get_peft_model(tiny_base(vocab_size=len(tokenizer)), METHODS[method](r=8, lora_alpha=16))
    randomize_adapters(sft, std=0.1)
    sft.save_pretrained(tmp_path / "sft")
    policy = PeftModel.from_pretrained(tiny_base(vocab_size=len(tokenizer)), tmp_path / "sft", is_trainable=True)
    rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"][::-1]} for r in dataset]
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=4, report_to=[],
                     logging_steps=1, save_strategy="no", use_cpu=True, max_length=48, dataloader_num_workers=0)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=type(dataset).from_list(rows[:8]),
                         processing_class=tokenizer)
    model = trainer.model.eval()
    ids, mask, _ = batch(2, 8, vocab=len(tokenizer))
    with torch.no_grad():
        trained = model(input_ids=ids, attention_mask=mask).logits
        model.set_adapter("ref")
        reference = model(input_ids=ids, attention_mask=mask).logits
        model.set_adapter("default")
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(reference, trained, atol=0, rtol=0)
    assert (trained - base).abs().max() > 1e-2  # the adapter is really trained, so a fresh reference would differ
    # the router statistics are the policy's too, although the "ref" copy runs after it (before: only "ref")
    import peft_mole

    peft_mole.RouterStatsCallback.attach(trainer, plot=False)
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry if key.startswith("router/")}
    assert "router/model.layers.0.mlp/entropy" in logged  # the trained adapter's
    assert not any(key.startswith("router/ref/") for key in logged)  # not the frozen copy's
    assert {adapter for adapter, _ in model.base_model.router_stats()} == {"default", "ref"}
