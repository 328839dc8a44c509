"""Per-job evaluation and early stopping as Trainer with `EarlyStoppingCallback` does them for one job (a review,
2026-12-08): the eval losses are scripted, so each test checks the decisions alone."""

from __future__ import annotations

import math
import os

import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback

from peft_mole import JobConfig, MultiJobTrainer
from tests.helpers import tiny_base
from tests.multijob.test_trainer import ALL_LINEAR, run_args

LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR)
EVAL = dict(eval_strategy="steps", eval_steps=1, metric_for_best_model="eval_loss")


def scripted(assets, tmp_path, losses, start=None, callbacks=None, patience=None, **args) -> MultiJobTrainer:
    """A one-job trainer whose eval loss after step s is losses[s - 1] (`start` before the first step)."""
    tokenizer, datasets = assets
    job = JobConfig("a", LORA, datasets["capital"], eval_dataset=datasets["capital"], early_stopping_patience=patience)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], processing_class=tokenizer,
                              args=run_args(tmp_path, **{**EVAL, **args}), callbacks=callbacks)
    def eval_loss(name: str, batch_size: int) -> float:
        step = trainer.runs[0].global_step if getattr(trainer, "runs", None) else 0
        return losses[step - 1] if step else start

    trainer._eval_loss = eval_loss
    return trainer


def test_the_start_evaluation_is_no_baseline_for_patience(assets, tmp_path):
    """Trainer's patience compares evaluations after a step: a lower start loss stopped the job at step 1 where
    SFTTrainer with EarlyStoppingCallback(1) trains all 6 steps (the losses improve at every step)."""
    trainer = scripted(assets, tmp_path, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5], start=0.4, patience=1, max_steps=6,
                       eval_on_start=True)
    trainer.train()
    assert (trainer.runs[0].status, trainer.runs[0].global_step) == ("done", 6)
    assert trainer.runs[0].stats.best_step == 6


def test_a_nan_eval_loss_is_never_the_best(assets, tmp_path):
    """Trainer's best starts at +inf and NaN < x is never true: a first NaN loss stayed the best for good, so the
    job stopped after `patience` evaluations while its loss fell."""
    trainer = scripted(assets, tmp_path, [math.nan, 3.0, 2.0, 1.0], patience=2, max_steps=4)
    trainer.train()
    run = trainer.runs[0]
    assert (run.status, run.global_step, run.stats.best_step, run.stats.best_metric) == ("done", 4, 4, 1.0)


def test_an_early_stop_ends_its_epoch(assets, tmp_path):
    """Trainer leaves its epoch loop at an early stop and ends the epoch: `save_strategy="epoch"` checkpoints the
    stop step and callbacks get `on_epoch_end` there (none of either before)."""
    ends = []

    class Ends(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            ends.append(state.global_step)

    trainer = scripted(assets, tmp_path, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], patience=1, callbacks=[Ends()],
                       max_steps=-1, num_train_epochs=1, save_strategy="epoch")
    trainer.train()
    assert (trainer.runs[0].status, trainer.runs[0].global_step) == ("stopped_early", 2)
    assert ends == [2] and "checkpoint-2" in os.listdir(tmp_path / "a")


def test_a_callback_stop_ends_with_the_best_adapter_loaded(assets, tmp_path):
    """Trainer loads the best model at the end of train() whatever stopped it; a callback's stop left the last
    step's adapter, which `save_model()` then wrote."""
    class StopAt4(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    trainer = scripted(assets, tmp_path, [3.0, 1.0, 2.0, 4.0, 5.0, 6.0], callbacks=[StopAt4()], max_steps=6,
                       learning_rate=5e-2, save_strategy="steps", save_steps=1, load_best_model_at_end=True)
    trainer.train()
    trainer.save_model()
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    best = load_file(tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(tmp_path / "a" / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], best[k]) for k in best)
    assert not all(torch.equal(last[k], best[k]) for k in best)


def test_evaluate_sends_on_evaluate_with_its_metrics(assets, tmp_path):
    seen = []

    class Recording(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(dict(metrics))

    trainer = scripted(assets, tmp_path, [2.0], start=1.5, callbacks=[Recording()])
    assert trainer.evaluate() == {"a/eval_loss": 1.5} and seen == [{"a/eval_loss": 1.5}]


def test_eval_steps_without_an_eval_set_is_refused(assets):
    import pytest

    with pytest.raises(ValueError, match="job 'a': eval_steps needs an eval_dataset"):
        JobConfig("a", LORA, assets[1]["capital"], eval_steps=5)
