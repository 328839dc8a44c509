"""A job's own Trainer callback events and logs (`multijob.job_step`): each job sends `on_epoch_begin/end`,
`on_substep_end`, `on_pre_optimizer_step`, `on_optimizer_step` and `on_save` as SFTTrainer training it alone sends
them, with its arguments, step and epoch, and logs what it logs (`grad_norm` also without clipping, `entropy`,
`mean_token_accuracy`, `num_tokens`, `aux_loss`); `logging_strategy="no"` logs nothing."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import SFTTrainer

from peft_mole import JobConfig, MultiJobTrainer
from peft_mole.multijob.job_step import JOB_EVENTS
from tests.helpers import mixlora, tiny_base
from tests.multijob.test_trainer import ALL_LINEAR, run_args

LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR)


class Record(TrainerCallback):
    """Every job event as (job, event, step, epoch, whether the checkpoint folder of an on_save exists), and the
    optimizer, scheduler and loader each event was given."""

    def __init__(self) -> None:
        self.events, self.objects, self.save_steps = [], [], set()
        for event in JOB_EVENTS:
            setattr(self, event, lambda args, state, control, event=event, **kwargs: self._record(event, args, state,
                                                                                                  kwargs))

    def _record(self, event, args, state, kwargs) -> None:
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        saved = os.path.isfile(os.path.join(folder, "adapter_model.safetensors")) if event == "on_save" else None
        self.events.append((kwargs.get("job"), event, state.global_step, round(state.epoch, 6), saved))
        self.objects.append((kwargs.get("job"), kwargs["optimizer"], kwargs["lr_scheduler"], kwargs["train_dataloader"]))
        self.save_steps.add((kwargs.get("job"), state.save_steps))


def test_each_job_sends_the_events_sft_trainer_sends_training_it_alone(assets, tmp_path):
    """"lora": 24 rows in micro-batches of 4, windows of 2 (3 steps an epoch), 4 steps: two epochs begin, the first
    ends at step 3, the run at step 4 (Trainer ends the epoch it stops in); a sub-step ends the first micro-batch of
    every window; checkpoints at steps 2 and 4 are on disk when `on_save` comes. "mix" beside it sends its own."""
    tokenizer, datasets = assets
    options = dict(save_strategy="steps", save_steps=2, max_steps=4)
    record = Record()
    jobs = [JobConfig("lora", LORA, datasets["sentiment"], gradient_accumulation_steps=2),
            JobConfig("mix", mixlora(), datasets["capital"], per_device_train_batch_size=3, save_steps=3)]
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                              args=run_args(tmp_path / "run", **options), callbacks=[record])
    trainer.train()
    together = {job.name: [e[1:] for e in record.events if e[0] == job.name] for job in jobs}
    assert {e[0] for e in record.events} == {"lora", "mix"}

    solo_record = Record()
    solo_args = jobs[0].training_args(run_args(tmp_path / "solo", **options))
    solo = get_peft_model(tiny_base(vocab_size=len(tokenizer)), LORA)
    SFTTrainer(model=solo, args=solo_args, train_dataset=jobs[0].train_dataset, processing_class=tokenizer,
               callbacks=[solo_record]).train()
    alone = [e[1:] for e in solo_record.events]
    assert together["lora"] == alone
    assert [e[:2] for e in alone if e[0] in ("on_epoch_begin", "on_epoch_end", "on_save")] == [
        ("on_epoch_begin", 0), ("on_save", 2), ("on_epoch_end", 3), ("on_epoch_begin", 3), ("on_save", 4),
        ("on_epoch_end", 4)]
    assert all(e[3] for e in together["lora"] + together["mix"] if e[0] == "on_save")
    assert [e[1] for e in together["mix"] if e[0] == "on_save"] == [3, 4]  # its own save_steps, and its last step
    # (as Trainer saves at max_steps; before 2026-12-05, eighth session, a job's last step was not checkpointed)
    assert sum(e[0] == "on_optimizer_step" for e in together["mix"]) == 4
    assert not [e for e in together["mix"] if e[0] == "on_substep_end"]  # no accumulation
    assert record.save_steps == {("lora", 2), ("mix", 3)}  # the state a job's event carries holds its own settings
    runs = {run.name: run for run in trainer.runs}
    for job, optimizer, scheduler, loader in record.objects:
        assert (optimizer, scheduler, loader) == (runs[job].optimizer, runs[job].scheduler, runs[job].dataloader)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_grad_norm_is_logged_with_and_without_clipping_as_sft_trainer_logs_it(assets, tmp_path, max_grad_norm):
    """Trainer logs the gradient norm before clipping, also with `max_grad_norm=0` (before: not logged then)."""
    tokenizer, datasets = assets
    job = JobConfig("lora", LORA, datasets["sentiment"], max_grad_norm=max_grad_norm)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], processing_class=tokenizer,
                              args=run_args(tmp_path / "run"))
    trainer.jobs_model.save_job("lora", str(tmp_path / "init"))
    trainer.train()
    together = [h["lora/grad_norm"] for h in trainer.state.log_history if "lora/loss" in h]
    solo = PeftModel.from_pretrained(tiny_base(vocab_size=len(tokenizer)), str(tmp_path / "init"), is_trainable=True)
    solo_trainer = SFTTrainer(model=solo, args=job.training_args(run_args(tmp_path / "solo")),
                              train_dataset=job.train_dataset, processing_class=tokenizer)
    solo_trainer.train()
    alone = [h["grad_norm"] for h in solo_trainer.state.log_history if "loss" in h]
    assert len(together) == 3 and min(together) > 0
    assert together == pytest.approx(alone, rel=1e-4)


def test_logging_strategy_no_logs_no_job_step(assets, tmp_path):
    """`logging_strategy="no"`: no job's step is logged, not even its last (before: the last one was); with
    `logging_first_step` only the first, as Trainer's flow callback does."""
    tokenizer, datasets = assets
    for first, expected in ((False, []), (True, [1])):
        job = JobConfig("mix", mixlora(), datasets["capital"], max_steps=3)
        trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], processing_class=tokenizer,
                                  args=run_args(tmp_path / str(first), logging_strategy="no", logging_first_step=first))
        trainer.train()
        assert [h["mix/step"] for h in trainer.state.log_history if "mix/loss" in h] == expected
        assert trainer.job_summary[0]["steps"] == 3


@pytest.mark.parametrize("padding_free", [False, True])
def test_a_jobs_entropy_accuracy_tokens_and_aux_loss_are_logged_as_alone(assets, tmp_path, padding_free):
    """SFTTrainer logs `entropy`, `mean_token_accuracy`, `aux_loss` (means over the micro-batches since the last
    log; the aux loss for a model with routers) and `num_tokens` (input tokens so far); each job logs its own as
    `<job>/...`, equal to its run alone (before: not logged). Repetitive rows and a high learning rate make the
    accuracy rise above 0, so the comparison means something; windows of 2 micro-batches, logged every 2 steps."""
    tokenizer, _ = assets
    rows = [{"text": " ".join(["red blue"] * (3 + i % 5))} for i in range(16)]
    job = JobConfig("mix", mixlora(), Dataset.from_list(rows), gradient_accumulation_steps=2,
                    per_device_train_batch_size=2)
    options = dict(max_steps=6, logging_steps=2, learning_rate=0.05, padding_free=padding_free,
                   **({"max_length": None} if padding_free else {}))
    others = JobConfig("lora", LORA, Dataset.from_list(rows[::-1]), per_device_train_batch_size=3)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job, others],
                              processing_class=tokenizer, args=run_args(tmp_path / "run", **options))
    trainer.jobs_model.save_job("mix", str(tmp_path / "init"))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "mix/loss" in h]
    solo = PeftModel.from_pretrained(tiny_base(vocab_size=len(tokenizer)), str(tmp_path / "init"), is_trainable=True)
    solo_trainer = SFTTrainer(model=solo, args=job.training_args(run_args(tmp_path / "solo", **options)),
                              train_dataset=job.train_dataset, processing_class=tokenizer)
    solo_trainer.train()
    alone = [h for h in solo_trainer.state.log_history if "loss" in h]
    assert len(logged) == len(alone) == 3
    for key in ("entropy", "mean_token_accuracy", "num_tokens", "aux_loss"):
        assert [h[f"mix/{key}"] for h in logged] == pytest.approx([h[key] for h in alone], rel=1e-4, abs=1e-6), key
    # above 0 in some log, so the comparison means something (lr 0.05 makes it oscillate: 0, 0.12, 0 padded)
    assert max(h["mix/mean_token_accuracy"] for h in logged) > 0.05
    assert logged[-1]["mix/num_tokens"] > logged[0]["mix/num_tokens"] > 0
    assert all(h["mix/aux_loss"] > 0 for h in logged)
    assert not [h for h in trainer.state.log_history if "lora/aux_loss" in h]  # a LoRA job has no router


def test_job_events_are_notifications_and_a_stop_in_one_stops_the_run(assets, tmp_path):
    """With `save_strategy="epoch"` transformers' flow callback sets `control.should_save` at a job's epoch end; a
    job event's flags are set back after it (no flag lingers into the mixed step's `on_step_end`), and a job stops
    in the middle of an epoch with a checkpoint of its last step, as Trainer saves the epoch it stops in. A
    callback's `should_training_stop` in a job event stops the run, every unfinished job checkpointed."""
    tokenizer, datasets = assets
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append((control.should_save, control.should_evaluate, control.should_log))

    job = JobConfig("lora", LORA, datasets["sentiment"], gradient_accumulation_steps=2, max_steps=4)  # 3 an epoch
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], processing_class=tokenizer,
                              args=run_args(tmp_path / "epoch", save_strategy="epoch", logging_strategy="epoch"),
                              callbacks=[Watch()])
    trainer.train()
    assert seen and not any(any(flags) for flags in seen)
    assert sorted(os.listdir(tmp_path / "epoch" / "lora")).count("checkpoint-3") == 1
    assert os.path.isdir(tmp_path / "epoch" / "lora" / "checkpoint-4")  # the last step, mid-epoch

    class StopAtSecondOptimizerStep(TrainerCallback):
        def on_optimizer_step(self, args, state, control, job=None, **kwargs):
            if job == "mix" and state.global_step == 1:
                control.should_training_stop = True

    jobs = [JobConfig("lora", LORA, datasets["sentiment"], max_steps=6),
            JobConfig("mix", mixlora(), datasets["capital"], max_steps=6)]
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                              args=run_args(tmp_path / "stop"), callbacks=[StopAtSecondOptimizerStep()])
    trainer.train()
    assert {run.name: run.global_step for run in trainer.runs} == {"lora": 2, "mix": 2}
    assert all(os.path.isdir(tmp_path / "stop" / name / "checkpoint-2") for name in ("lora", "mix"))


def test_a_stop_checkpoints_no_nan_job_and_save_model_leaves_it_out(assets, tmp_path):
    """A callback makes one job's weights NaN and stops the run: the stop's checkpoints go through the same guard
    as every checkpoint (that job fails alone, its last good checkpoint kept under save_total_limit=1, no NaN
    checkpoint written), and `save_model()` writes the other job's adapter whole but not the failed job's."""
    tokenizer, datasets = assets
    trainer = None

    class PoisonAndStop(TrainerCallback):
        def on_optimizer_step(self, args, state, control, job=None, **kwargs):
            if job == "mix" and state.global_step == 2:
                run = next(r for r in trainer.runs if r.name == "mix")
                with torch.no_grad():
                    run.stepped_tensors()[0].fill_(float("nan"))
                control.should_training_stop = True

    jobs = [JobConfig("lora", LORA, datasets["sentiment"], max_steps=6),
            JobConfig("mix", mixlora(), datasets["capital"], max_steps=6)]
    out = tmp_path / "stop"
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                              args=run_args(out, save_strategy="steps", save_steps=2, save_total_limit=1),
                              callbacks=[PoisonAndStop()])
    trainer.train()
    status = {run.name: (run.status, run.global_step) for run in trainer.runs}
    assert status == {"lora": ("running", 3), "mix": ("failed", 3)}  # step 3: no checkpoint of save_steps
    assert "non-finite" in next(r for r in trainer.runs if r.name == "mix").error
    assert sorted(n for n in os.listdir(out / "mix") if n.startswith("checkpoint-")) == ["checkpoint-2"]
    assert sorted(n for n in os.listdir(out / "lora") if n.startswith("checkpoint-")) == ["checkpoint-3"]
    assert os.path.isfile(out / "mix" / "job_failed.json")
    good = load_file(out / "mix" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())

    trainer.save_model()
    assert not os.path.exists(out / "mix" / "adapter_model.safetensors")
    saved = load_file(out / "lora" / "adapter_model.safetensors")
    expected = trainer.jobs_model.job_state_dict("lora")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    assert not [n for n in os.listdir(out / "lora") if n.startswith(".tmp-final-")]


def test_a_jobs_own_logging_steps_are_its_default_eval_steps_as_alone(assets, tmp_path):
    """The trainer logs every step and evaluates "steps" with no eval_steps (TrainingArguments fills them in from
    its logging_steps); a job logging every 3 steps is evaluated every 3, as trained alone (it was every step)."""
    tokenizer, datasets = assets
    job = JobConfig("lora", LORA, datasets["sentiment"], eval_dataset=datasets["sentiment"], logging_steps=3,
                    max_steps=6)
    args = run_args(tmp_path, eval_strategy="steps", logging_steps=1)
    assert args.eval_steps == 1 and job.training_args(args).eval_steps == 3
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], processing_class=tokenizer,
                              args=args)
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "lora/eval_loss" in h] == [3, 6]
    explicit = JobConfig("lora", LORA, datasets["sentiment"], logging_steps=3, eval_steps=2,
                         eval_dataset=datasets["capital"])
    assert explicit.training_args(args).eval_steps == 2
    assert job.training_args(run_args(tmp_path, eval_strategy="steps", eval_steps=2)).eval_steps == 2
