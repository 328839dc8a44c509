"""Each job's optimizer and scheduler set up as Trainer sets them up for that job alone, and what cannot be refused
when the job is made, by name (a review of the per-job optimization, 2026-12-08)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import Trainer

from peft_mole import JobConfig, MultiJobTrainer
from peft_mole.multijob import mixed_batch, per_job_losses
from peft_mole.multijob.decay import decayed_names
from peft_mole.multijob.model import MultiJobModel
from tests.helpers import tiny_base
from tests.multijob.test_trainer import run_args

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def test_schedulers_that_step_on_a_metric_are_refused_when_the_job_is_made(assets):
    """transformers' "greedy" scheduler steps on a metric, as reduce_lr_on_plateau: it was taken, and every job
    using it failed at its first step (`step() missing ... 'metrics'`)."""
    _, datasets = assets
    with pytest.raises(ValueError, match="job 'g': lr_scheduler_type='greedy' .*on no metric"):
        JobConfig("g", LORA, datasets["add"], lr_scheduler_type="greedy")


def test_a_scheduler_kwarg_checked_against_the_jobs_learning_rate_fails_naming_the_job(assets, tmp_path):
    """The set-up check built each scheduler on a stand-in optimizer of learning rate 1.0: polynomial's lr_end 1e-4
    passed, and `train()` failed for every job without naming one."""
    tokenizer, datasets = assets
    job = JobConfig("poly", LORA, datasets["add"], learning_rate=1e-5, lr_scheduler_type="polynomial",
                    lr_scheduler_kwargs={"lr_end": 1e-4})
    with pytest.raises(ValueError, match=r"job 'poly': lr_scheduler_type='polynomial' cannot be built .*lr_end"):
        MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], args=run_args(tmp_path),
                        processing_class=tokenizer)
    fine = JobConfig("poly", LORA, datasets["add"], learning_rate=1e-3, lr_scheduler_type="polynomial",
                     lr_scheduler_kwargs={"lr_end": 1e-4})
    MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[fine], args=run_args(tmp_path),
                    processing_class=tokenizer)


def test_a_seed_outside_what_set_seed_takes_is_refused_naming_the_job(assets):
    _, datasets = assets
    with pytest.raises(ValueError, match=r"job 's': seed must be an int in \[0, 2\*\*32\), got 4294967296"):
        JobConfig("s", LORA, datasets["add"], seed=2**32)
    assert JobConfig("s", LORA, datasets["add"], seed=2**32 - 1).seed == 2**32 - 1


def test_a_decay_rule_over_trainable_tensors_sees_the_jobs_tensors_as_trainable():
    """A subclass's `get_decay_parameter_names` that keeps trainable tensors only decayed nothing: the stand-ins
    for a job's tensors did not require grad."""
    def rule(model):
        return [n for n, p in model.named_parameters() if p.requires_grad and n in
                Trainer.get_decay_parameter_names(None, model)]

    model = MultiJobModel(tiny_base(), {"a": LORA})
    names = model.job_parameters("a")
    assert len(names) == 8 and decayed_names(rule, names, "a", model.prefix) == set(names)


def test_per_job_losses_adds_the_aux_loss_as_the_trainer_does():
    """c · aux / G, as MultiJobTrainer (SFTTrainer's `router_aux_loss_coef`, the window's mean); it added the whole
    aux loss to every micro-batch, G times the trainer's gradient under accumulation."""
    gen = torch.Generator().manual_seed(0)
    parts = {job: torch.randint(3, 50, (rows, 6), generator=gen) for job, rows in (("a", 1), ("b", 2))}
    mixed = mixed_batch({job: {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
                         for job, ids in parts.items()})
    logits = torch.randn(3, 6, 50, generator=gen)
    aux = {"b": torch.tensor(0.7)}
    plain = per_job_losses(logits, mixed.labels, mixed)
    scaled = per_job_losses(logits, mixed.labels, mixed, aux_per_adapter=aux, aux_coefficient=0.02, micro_batches=4)
    assert torch.equal(scaled["a"], plain["a"])
    torch.testing.assert_close(scaled["b"], plain["b"] + 0.02 * 0.7 / 4)
    assert torch.equal(per_job_losses(logits, mixed.labels, mixed, aux_per_adapter=aux, aux_coefficient=0.0)["b"],
                       plain["b"])
    with pytest.raises(ValueError, match="micro_batches must be an int >= 1"):
        per_job_losses(logits, mixed.labels, mixed, micro_batches=0)
