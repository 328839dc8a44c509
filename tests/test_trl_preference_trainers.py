"""TRL's KTO, GRPO and RLOO trainers, given `peft_config=MixLoRAConfig/DynMoLEConfig`: each adds the adapter's aux
loss at weight 1 (the model declares it as a Mixture-of-Experts model does), `router_aux_loss_coef=0.0` turns it
off, and the trained adapter saves and reloads exactly. DPO is tested in tests/test_trainer_integration.py."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import PeftModel

from peft_mole import synthetic
from tests.helpers import METHODS, batch, tiny_base


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic.demo_tokenizer()


def _length_reward(completions, **kwargs):
    return [float(len(completion)) for completion in completions]


def _trainer(kind: str, method: str, tokenizer, output_dir, **coef):
    """One step of `kind` on 4 rows of the generated tasks, the adapter made by the trainer from `peft_config`."""
    import trl

    rows = synthetic.multitask_rows(8)
    common = dict(output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=4, learning_rate=5e-3,
                  logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0,
                  dataloader_num_workers=0, **coef)
    model, config = tiny_base(vocab_size=len(tokenizer)), METHODS[method]()
    if kind == "kto":
        data = Dataset.from_list([{"prompt": r["prompt"], "label": bool(i % 2),  # a wrong answer: reversed
                                   "completion": r["completion"] if i % 2 else r["completion"][::-1]}
                                  for i, r in enumerate(rows)])
        return trl.KTOTrainer(model=model, args=trl.KTOConfig(max_length=48, **common), train_dataset=data,
                              processing_class=tokenizer, peft_config=config)
    config_class, trainer_class = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer),
                                   "rloo": (trl.RLOOConfig, trl.RLOOTrainer)}[kind]
    data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    return trainer_class(model=model, reward_funcs=_length_reward, train_dataset=data, processing_class=tokenizer,
                         args=config_class(max_completion_length=6, num_generations=2, **common), peft_config=config)


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
@pytest.mark.parametrize("kind", ["kto", "grpo", "rloo"])
def test_trainer_adds_the_aux_loss_at_weight_one_and_saves_an_exact_adapter(kind, method, tokenizer, tmp_path):
    runs = {}
    for name, coef in (("with", {}), ("without", {"router_aux_loss_coef": 0.0})):
        trainer = _trainer(kind, method, tokenizer, tmp_path / name, **coef)
        assert trainer.aux_loss_enabled == (name == "with")
        trainer.train()
        (logged,) = [entry for entry in trainer.state.log_history if "loss" in entry]
        runs[name] = (trainer, logged)
    (trainer, with_aux), (_, without) = runs["with"], runs["without"]
    assert "aux_loss" not in without and with_aux["aux_loss"] > 1e-3
    # the same step (seed, rows, generations) but for the aux loss: the losses differ by it exactly
    assert with_aux["loss"] - without["loss"] == pytest.approx(with_aux["aux_loss"], abs=2e-6)
    model = trainer.model.eval()
    ids, mask, _ = batch(2, 8, vocab=len(tokenizer))
    model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(tiny_base(vocab_size=len(tokenizer)), tmp_path / "adapter").eval()
    with torch.no_grad():
        want, got = model(input_ids=ids, attention_mask=mask).logits, again(input_ids=ids, attention_mask=mask).logits
        with again.disable_adapter():
            base = again(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want) and (got - base).abs().max() > 1e-3  # the trained adapter, not a fresh one
