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
    for name, p in trainer.model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == p.requires_grad, name  # adapters moved, the base did not


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_sft_trainer_loss_includes_the_router_aux_loss(method, local_assets, tmp_path):
    tokenizer, dataset = local_assets
    base = tiny_base(vocab_size=len(tokenizer))
    big = dict(router_aux_loss_coef=0.7) if method == "mixlora" else dict(entropy_loss_coef=0.7)
    config = METHODS[method](r=8, **big)
    trainer = SFTTrainer(
        model=base, args=sft_args(tmp_path, gradient_checkpointing=False), train_dataset=dataset,
        processing_class=tokenizer, peft_config=config,
    )
    inputs = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()
    loss = trainer.compute_loss(model, dict(inputs))
    out = model(**inputs)  # the model's own loss: LM loss (logits path) + aux
    assert out.aux_loss > 0.5  # 0.7 x load balance (≥ 1 - a bit with random routing) is not negligible
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    lm_only = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), inputs["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss, lm_only + out.aux_loss, atol=1e-5, rtol=1e-5)


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
    the LM loss see each sequence as in a padded batch, so the adapter ends as with padding."""
    tokenizer, dataset = local_assets
    trained = {}
    for padding_free in (False, True):
        model = get_peft_model(tiny_base(vocab_size=len(tokenizer)), METHODS[method](r=8, lora_alpha=16))
        randomize_adapters(model)
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        # fp32 (bf16 autocast rounds the two layouts differently) and SGD (Adam's first steps turn float noise in
        # near-zero gradients into lr-sized moves)
        args = sft_args(tmp_path, max_steps=3, padding_free=padding_free, max_length=None, bf16=False, optim="sgd",
                        learning_rate=0.5)
        trainer = SFTTrainer(model=model, train_dataset=dataset, processing_class=tokenizer, args=args)
        if padding_free:
            assert "attention_mask" not in next(iter(trainer.get_train_dataloader()))
        trainer.train()
        trained[padding_free] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert max((trained[False][n] - initial[n]).abs().max().item() for n in initial) > 1e-3
    for name, value in trained[True].items():
        torch.testing.assert_close(value, trained[False][name], atol=1e-5, rtol=0, msg=name)
