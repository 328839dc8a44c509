"""Trainer options that MultiJobTrainer's own loop honours as `Trainer.train` does: what a step's logs carry
(`step`, `epoch`), `logging_first_step`, `eval_on_start`, `eval_delay`, `save_only_model` and
`torch_empty_cache_steps`."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import SFTTrainer

from peft_mole import JobConfig, MultiJobTrainer
from peft_mole.multijob import trainer as trainer_module
from peft_mole.multijob.checkpoint import list_checkpoints
from tests.helpers import dynmole, mixlora, tiny_base
from tests.multijob.test_resume import _StopAt
from tests.multijob.test_trainer import ALL_LINEAR, run_args

LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR)


def _trainer(assets, out, jobs, callbacks=(), **args) -> MultiJobTrainer:
    tokenizer, _ = assets
    return MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                           args=run_args(out, **args), callbacks=list(callbacks))


def test_a_jobs_logs_carry_the_mixed_step_and_epoch_they_were_made_in(assets, tmp_path):
    """Trainer.log adds `step` and `epoch` to each log; a job's log made in mixed step s says s, and the run's epoch
    after that step (before, both were one step behind). 24 rows each: "lora" steps every 2 micro-batches of 4 (3
    windows an epoch, counted when a window begins), "mix" every micro-batch of 3 (8 an epoch)."""
    _, datasets = assets
    jobs = [JobConfig("lora", LORA, datasets["sentiment"], gradient_accumulation_steps=2),
            JobConfig("mix", mixlora(), datasets["capital"], per_device_train_batch_size=3, max_steps=4)]
    trainer = _trainer(assets, tmp_path, jobs)
    trainer.train()
    logs = {job: [h for h in trainer.state.log_history if f"{job}/loss" in h] for job in ("lora", "mix")}
    assert [h["step"] for h in logs["lora"]] == [2, 4, 6]
    assert [h["step"] for h in logs["mix"]] == [1, 2, 3, 4]
    for job, entries in logs.items():
        for entry in entries:
            step = entry["step"]
            assert entry["epoch"] == pytest.approx(max(math.ceil(step / 2) / 3, min(step, 4) / 8)), (job, entry)
    assert [h["lora/epoch"] for h in logs["lora"]] == pytest.approx([2 / 6, 4 / 6, 1.0])


def test_logging_first_step_logs_each_jobs_first_step(assets, tmp_path):
    _, datasets = assets
    for first in (False, True):
        jobs = [JobConfig("mix", mixlora(), datasets["capital"], max_steps=4)]
        trainer = _trainer(assets, tmp_path / str(first), jobs, logging_steps=2, logging_first_step=first)
        trainer.train()
        steps = [h["mix/step"] for h in trainer.state.log_history if "mix/loss" in h]
        assert steps == ([1, 2, 4] if first else [2, 4])


def test_eval_on_start_and_eval_delay_by_steps(assets, tmp_path):
    """`eval_on_start` evaluates each job before its first step; `eval_delay=3` holds every `eval_steps=1`
    evaluation back until the job's step 3. Callbacks get every evaluation."""
    _, datasets = assets
    seen = []

    class Watch(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(metrics["wild/step"])

    jobs = [JobConfig("wild", LORA, datasets["sentiment"], eval_dataset=datasets["capital"], eval_steps=1,
                      max_steps=5)]
    trainer = _trainer(assets, tmp_path, jobs, [Watch()], eval_on_start=True, eval_delay=3)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "wild/eval_loss" in h]
    assert [h["wild/step"] for h in evals] == seen == [0, 3, 4, 5]
    assert evals[0]["step"] == 0  # before the first mixed step


def test_eval_delay_by_epochs(assets, tmp_path):
    """`eval_strategy="epoch"` with `eval_delay=2`: a job of 6 steps an epoch is evaluated at the end of its
    second and third epochs, not its first."""
    _, datasets = assets
    jobs = [JobConfig("wild", LORA, datasets["sentiment"], eval_dataset=datasets["capital"], max_steps=18)]
    trainer = _trainer(assets, tmp_path, jobs, eval_strategy="epoch", eval_delay=2)
    trainer.train()
    assert [h["wild/step"] for h in trainer.state.log_history if "wild/eval_loss" in h] == [12, 18]


def test_save_only_model_checkpoints_the_adapter_only_and_resume_says_it_cannot_continue(assets, tmp_path):
    """`save_only_model=True`: a job's checkpoints hold the adapter and the position, no optimizer, scheduler or
    random stream (Trainer's meaning). The checkpoint of a callback's stop is whole all the same (it is there to
    resume from): resume continues from it as the uninterrupted run would. Resuming from a model-only checkpoint
    could not continue exactly, so it is refused, naming the job."""
    _, datasets = assets

    class Logged(TrainerCallback):  # the job's steps logged by this run itself
        def __init__(self):
            self.steps = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "mix/loss" in (logs or {}):
                self.steps.append(logs["mix/step"])

    def run(out, callbacks=(), resume=False):
        jobs = [JobConfig("mix", mixlora(), datasets["capital"], max_steps=6)]
        logged = Logged()
        trainer = _trainer(assets, out, jobs, [*callbacks, logged], save_strategy="steps", save_steps=2,
                           save_only_model=True)
        trainer.train(resume_from_checkpoint=resume or None)
        final = out / "mix" / "adapter_model.safetensors"
        history = [h["mix/step"] for h in trainer.state.log_history if "mix/loss" in h]
        return (load_file(final) if final.exists() else None), logged.steps, history

    whole, _, _ = run(tmp_path / "whole")
    run(tmp_path / "stopped", [_StopAt(3)])
    checkpoints = tmp_path / "stopped" / "mix"
    assert [step for step, _ in list_checkpoints(checkpoints)] == [2, 3]  # step 3: stopped by the callback
    full = {"optimizer.pt", "scheduler.pt", "adapter_model.safetensors"}
    assert not set(os.listdir(checkpoints / "checkpoint-2")) & {"optimizer.pt", "scheduler.pt"}
    assert "adapter_model.safetensors" in os.listdir(checkpoints / "checkpoint-2")
    assert full <= set(os.listdir(checkpoints / "checkpoint-3"))
    shutil.copytree(tmp_path / "stopped", tmp_path / "model-only")
    resumed, steps, history = run(tmp_path / "stopped", resume=True)
    assert steps == [4, 5, 6]  # it continued from step 3 (a run from scratch would end the same: deterministic)
    assert history == [1, 2, 3, 4, 5, 6]  # its history holds the logs from before the resume too
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) <= 1e-6
    shutil.rmtree(tmp_path / "model-only" / "mix" / "checkpoint-3")  # the latest is now a model-only one
    with pytest.raises(ValueError, match=r"job 'mix'.*save_only_model=True.*cannot continue exactly"):
        run(tmp_path / "model-only", resume=True)


def test_torch_empty_cache_steps_empties_the_device_cache_every_n_mixed_steps(assets, tmp_path, monkeypatch):
    _, datasets = assets
    emptied = []
    trainer = _trainer(assets, tmp_path, [JobConfig("mix", mixlora(), datasets["capital"], max_steps=5)],
                       torch_empty_cache_steps=2)
    monkeypatch.setattr(trainer_module, "clear_device_cache", lambda: emptied.append(trainer.state.global_step))
    trainer.train()
    assert emptied == [2, 4]


def test_eval_strategy_no_evaluates_only_the_jobs_that_ask_and_compute_metrics_is_refused(assets, tmp_path):
    """As Trainer: with `eval_strategy="no"` (TRL's default) an eval_dataset alone is not evaluated during training
    (before, every job with one was, every logging_steps); a job that sets its own `eval_steps` is. With
    `eval_strategy="steps"` every job with an eval set is. `compute_metrics`, never called, is refused."""
    _, datasets = assets

    def jobs():
        return [JobConfig("plain", LORA, datasets["add"], eval_dataset=datasets["add"].select(range(4))),
                JobConfig("asks", LORA, datasets["capital"], eval_dataset=datasets["capital"].select(range(4)),
                          eval_steps=1)]

    def evaluated(trainer):
        return sorted({key.split("/")[0] for h in trainer.state.log_history for key in h if key.endswith("eval_loss")})

    default = _trainer(assets, tmp_path / "no", jobs(), max_steps=2)
    default.train()
    assert evaluated(default) == ["asks"]
    by_steps = _trainer(assets, tmp_path / "steps", jobs(), max_steps=2, eval_strategy="steps", eval_steps=1)
    by_steps.train()
    assert evaluated(by_steps) == ["asks", "plain"]
    with pytest.raises(ValueError, match="does not support compute_metrics"):
        MultiJobTrainer(model=tiny_base(), jobs=jobs(), args=run_args(tmp_path), compute_metrics=lambda p: {})


def test_each_job_starts_from_the_adapter_sft_trainer_makes_with_its_seed(assets, tmp_path):
    """SFTTrainer seeds (`args.seed`) before it makes the adapter; so does MultiJobTrainer, before each job's, with
    that job's seed (before: the adapters drew from torch's generator as the caller had left it)."""
    tokenizer, datasets = assets
    jobs = [JobConfig("lora", LORA, datasets["sentiment"]), JobConfig("mix", mixlora(), datasets["capital"], seed=1),
            JobConfig("dyn", dynmole(), datasets["add"], seed=0), JobConfig("mix2", mixlora(), datasets["add"])]
    torch.manual_seed(123)  # the caller's generator state no longer matters
    trainer = _trainer(assets, tmp_path / "run", jobs)
    for job in jobs:
        trainer.jobs_model.save_job(job.name, str(tmp_path / job.name))
        solo = SFTTrainer(model=tiny_base(vocab_size=len(tokenizer)), peft_config=job.peft_config,
                          args=job.training_args(run_args(tmp_path / "solo")), train_dataset=job.train_dataset,
                          processing_class=tokenizer)
        expected = get_peft_model_state_dict(solo.model)
        made = load_file(str(tmp_path / job.name / "adapter_model.safetensors"))
        assert made.keys() == expected.keys()
        for key in expected:
            assert torch.equal(made[key], expected[key]), (job.name, key)
    mix, mix2 = (trainer.jobs_model.job_parameters(n) for n in ("mix", "mix2"))
    assert not torch.equal(next(iter(mix.values())), next(iter(mix2.values())))  # seeds 1 and 0 differ


def test_a_model_path_loads_as_sft_trainer_loads_it(assets, tmp_path, caplog):
    """A base given by path is float32 unless `model_init_kwargs` give a dtype, as SFTTrainer loads it (before:
    the checkpoint's dtype, bfloat16 here, whatever SFTTrainer would train in); no warning that the
    `model_init_kwargs` it used are ignored."""
    tokenizer, datasets = assets
    tiny_base(vocab_size=len(tokenizer)).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    jobs = [JobConfig("lora", LORA, datasets["sentiment"])]
    for init, dtype in ((None, torch.float32), ({"dtype": "bfloat16"}, torch.bfloat16)):
        args = run_args(tmp_path / "run", model_init_kwargs=init)
        trainer = MultiJobTrainer(model=str(tmp_path / "base"), jobs=jobs, args=args, processing_class=tokenizer)
        solo = SFTTrainer(model=str(tmp_path / "base"), args=args, train_dataset=jobs[0].train_dataset,
                          processing_class=tokenizer)
        assert trainer.jobs_model.model.dtype == solo.model.dtype == dtype
    assert "model_init_kwargs" not in caplog.text


def test_weight_decay_reaches_every_job_whatever_its_name(assets, tmp_path):
    """Trainer's decay rule leaves out names with "bias" or a "norm" part; a job's name stands in its tensors'
    names, so jobs named "debias" or "q_norm" got no weight decay at all (before 2026-12-07). Each job now decays
    what the same adapter decays alone under SFTTrainer: every LoRA and MixLoRA tensor."""
    _, datasets = assets
    jobs = [JobConfig(name, config, datasets["add"]) for name, config in
            (("plain", LORA), ("debias", LORA), ("q_norm", LORA), ("rmsnorm_mix", mixlora()))]
    trainer = _trainer(assets, tmp_path, jobs, weight_decay=0.1)
    for job in jobs:
        run = trainer._make_run(job)
        decayed = {p for group in run.optimizer.param_groups if group["weight_decay"] == 0.1 for p in group["params"]}
        assert sum(p.numel() for p in decayed) == sum(p.numel() for p in run.params.values()) > 0, job.name
    alone = get_peft_model(tiny_base(), mixlora())  # alone, under PEFT's names, every adapter tensor decays
    trainable = {n for n, p in alone.named_parameters() if p.requires_grad}
    assert trainable and trainable <= set(trainer.get_decay_parameter_names(alone))
