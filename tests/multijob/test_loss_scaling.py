"""fp16 mixed precision: each job scales its loss with a GradScaler of its own, as Trainer scales one job's
(accelerate gives a GradScaler only on an accelerator; here one is handed to the trainer as accelerate would)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from peft import LoraConfig

from peft_mole import JobConfig
from peft_mole.multijob import mixed_step as mixed_step_module
from peft_mole.multijob import run as run_module
from tests.helpers import mixlora
from tests.multijob.test_faults import LORA, _adapter, _assert_same, _trainer


def _scaled_trainer(assets, out, scaler: bool, optim: str = "adamw_torch_fused"):
    """LoRA (2 micro-batches a step) and MixLoRA jobs, 4 steps, a checkpoint at each; `scaler`: the accelerator's
    GradScaler (scale 2^10), as accelerate makes one under fp16 on a GPU."""
    tokenizer, datasets = assets
    jobs = [JobConfig("lora", LoraConfig(**LORA), datasets["sentiment"], gradient_accumulation_steps=2),
            JobConfig("mix", mixlora(), datasets["capital"], per_device_train_batch_size=3)]
    trainer = _trainer(tokenizer, jobs, out, args={"optim": optim},
                       step_overhead_tokens=0)  # the same steps in every run (not timed)
    if scaler:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    return trainer


def _train(assets, out, monkeypatch, scaler: bool, inf_at: int | None = None, inf_loss_at: int | None = None,
           optim: str = "adamw_torch_fused"):
    """`_scaled_trainer` trained; `inf_at`: the LoRA job's gradient of that micro-batch gets one inf;
    `inf_loss_at`: that mixed step's log-probabilities overflow (times inf), as an fp16 forward past 65504 makes
    them, for every job in it."""
    trainer = _scaled_trainer(assets, out, scaler, optim)
    if inf_at is not None:
        calls, add = [], run_module.JobRun.add_gradients

        def add_with_inf(run, grads):
            calls.append(run.name)
            if run.name == "lora" and calls.count("lora") == inf_at:
                grads = list(grads)
                grads[0] = grads[0].clone().view(-1).index_fill(0, torch.tensor([0]), float("inf")).view_as(grads[0])
            add(run, grads)

        monkeypatch.setattr(run_module.JobRun, "add_gradients", add_with_inf)
    if inf_loss_at is not None:
        steps, log_probs = [], mixed_step_module.at_least_fp32

        def overflowing(x):
            steps.append(1)
            return log_probs(x) * (float("inf") if len(steps) == inf_loss_at else 1.0)

        monkeypatch.setattr(mixed_step_module, "at_least_fp32", overflowing)
    trainer.train()
    return trainer, {run.name: run for run in trainer.runs}


def test_scaled_losses_train_exactly_as_unscaled(assets, tmp_path, monkeypatch):
    # a power-of-two scale and its inverse are exact in fp32: the same adapters, bit for bit, when nothing overflows
    _train(assets, tmp_path / "plain", monkeypatch, scaler=False)
    _, runs = _train(assets, tmp_path / "scaled", monkeypatch, scaler=True)
    for name in ("lora", "mix"):
        assert runs[name].scaler.get_scale() == 2.0**10
        plain, scaled = _adapter(tmp_path / "plain" / name), _adapter(tmp_path / "scaled" / name)
        _assert_same(plain, scaled, atol=0.0)


def trainer_steps_the_schedule_after_a_skip(optim: str) -> bool:
    """What Trainer does with the LR schedule after a step the GradScaler skipped: it steps it unless accelerate's
    optimizer says the step was skipped, which it says only where the scaler did not call the optimizer's step."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=optim == "adamw_torch_fused")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    accelerated = AcceleratedOptimizer(optimizer, device_placement=False, scaler=scaler)
    scaler.scale(torch.ones(()))  # (the scaler's state, made at its first scaled loss)
    param.grad = torch.tensor([float("inf"), 1.0, 1.0, 1.0])
    accelerated.step()
    return not accelerated.step_was_skipped


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_a_step_with_an_inf_gradient_is_skipped_for_that_job_only(assets, tmp_path, monkeypatch, optim):
    # before: no job had a scaler, the step was taken and the job's adapter became NaN
    _train(assets, tmp_path / "plain", monkeypatch, scaler=False, optim=optim)
    trainer, runs = _train(assets, tmp_path / "inf", monkeypatch, scaler=True, inf_at=3, optim=optim)  # step 2's
    lora = runs["lora"]
    assert lora.status == "done" and lora.global_step == 4
    assert lora.scaler.get_scale() == 2.0**9 and runs["mix"].scaler.get_scale() == 2.0**10
    # the schedule after the skipped step, as Trainer's: a fused optimizer's steps on (it was one behind before
    # 2026-12-07), an unfused one's does not
    assert trainer_steps_the_schedule_after_a_skip(optim) == (optim == "adamw_torch_fused")
    assert lora.scheduler.last_epoch == (4 if trainer_steps_the_schedule_after_a_skip(optim) else 3)
    adapter = _adapter(tmp_path / "inf" / "lora")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    # its checkpoint after step 1 equals the run without the fault; after step 2 (skipped) it is unchanged
    step1, step2 = (_adapter(tmp_path / "inf" / "lora" / f"checkpoint-{s}") for s in (1, 2))
    _assert_same(step1, _adapter(tmp_path / "plain" / "lora" / "checkpoint-1"), atol=0.0)
    _assert_same(step1, step2, atol=0.0)
    _assert_same(_adapter(tmp_path / "inf" / "mix"), _adapter(tmp_path / "plain" / "mix"), atol=0.0)
    saved = torch.load(tmp_path / "inf" / "lora" / "checkpoint-4" / "scaler.pt", weights_only=True)
    assert saved["scale"] == 2.0**9  # written with the checkpoint, as Trainer's scaler.pt


def test_resume_restores_each_jobs_loss_scale(assets, tmp_path, monkeypatch):
    resume_from = 2  # the step after the skipped one
    _train(assets, tmp_path / "inf", monkeypatch, scaler=True, inf_at=3)
    for name in ("lora", "mix"):  # as if stopped after step `resume_from`: resume continues from its checkpoint
        os.rename(tmp_path / "inf" / name / "job_state.json", tmp_path / f"{name}-final.json")
        for step in range(resume_from + 1, 5):
            os.rename(tmp_path / "inf" / name / f"checkpoint-{step}", tmp_path / f"{name}-{step}")
    trainer = _scaled_trainer(assets, tmp_path / "inf", scaler=True)
    trainer.train(resume_from_checkpoint=True)
    runs = {run.name: run for run in trainer.runs}
    assert runs["lora"].scaler.get_scale() == 2.0**9  # (a fresh scaler would say 2**10)
    _assert_same(_adapter(tmp_path / "inf" / "lora"), _adapter(tmp_path / "lora-4"), atol=0.0)


def test_a_non_finite_loss_with_a_scaler_skips_the_step_instead_of_failing_the_job(assets, tmp_path, monkeypatch):
    # as Trainer's GradScaler: the overflowed step's gradients are not finite, so it is skipped and training goes
    # on (before: the jobs in that step failed, "its loss became inf"); without a scaler they still fail
    trainer, runs = _train(assets, tmp_path / "scaled", monkeypatch, scaler=True, inf_loss_at=2)
    skipped = {name for name, run in runs.items() if run.scaler.get_scale() == 2.0**9}
    assert skipped and all(runs[name].scheduler.last_epoch == 4 for name in skipped)  # (fused: as Trainer)
    for name in skipped:  # its logged loss leaves the overflow out, as Trainer's logging_nan_inf_filter (which
        # takes the mean of the steps since the last log: 0.0 for a skipped first step, as here)
        losses = [h[f"{name}/loss"] for h in trainer.state.log_history if f"{name}/loss" in h]
        assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses), losses
    for name, run in runs.items():
        assert (run.status, run.global_step) == ("done", 4), name
        assert all(torch.isfinite(t).all() for t in _adapter(tmp_path / "scaled" / name).values())
    monkeypatch.undo()
    _, runs = _train(assets, tmp_path / "plain", monkeypatch, scaler=False, inf_loss_at=2)
    assert {name for name, run in runs.items() if run.status == "failed"} == skipped
