"""MultiJobTrainer end to end: jobs trained together equal each job trained alone by SFTTrainer; logs, saving."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback, modeling_utils
from trl import SFTConfig, SFTTrainer

from peft_mole import JobConfig, MultiJobTrainer
from tests.helpers import dynmole, mixlora, randomize_adapters, tiny_base

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_args(output_dir, **overrides) -> SFTConfig:
    settings = dict(
        output_dir=str(output_dir), max_length=40, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
        gradient_checkpointing=False, seed=0, dataloader_num_workers=0, learning_rate=1e-3, max_steps=3,
        per_device_train_batch_size=4, bf16=False,  # TRL's default is bf16 autocast, also on CPU
    )
    settings.update(overrides)
    return SFTConfig(**settings)


# each of `three_jobs`' own settings; the solo SFTTrainer runs take them from here as SFTConfig fields, not through
# `JobConfig.training_args`, so a field that a job ignored would make the runs differ
OWN_SETTINGS = {
    "lora": dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=2e-3),
    "mix": dict(per_device_train_batch_size=3, max_steps=4, seed=1),
    "dyn": dict(per_device_train_batch_size=2, gradient_accumulation_steps=3, max_steps=2, warmup_steps=1,
                weight_decay=0.1, max_grad_norm=0.05),
}


def three_jobs(datasets) -> list[JobConfig]:
    return [
        JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                  datasets["sentiment"], **OWN_SETTINGS["lora"]),
        JobConfig("mix", mixlora(), datasets["capital"], **OWN_SETTINGS["mix"]),
        JobConfig("dyn", dynmole(), datasets["add"], **OWN_SETTINGS["dyn"]),
    ]


@pytest.mark.parametrize("checkpointing", [False, True])  # True: TRL's default; the solo runs never checkpoint
def test_jobs_trained_together_equal_each_trained_alone(assets, tmp_path, monkeypatch, checkpointing):
    tokenizer, datasets = assets
    vocab = len(tokenizer)
    jobs = three_jobs(datasets)
    args = run_args(tmp_path / "run", gradient_checkpointing=checkpointing)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=vocab), jobs=jobs, args=args, processing_class=tokenizer)
    checkpointed = []  # the layers Trainer's checkpointing runs (MultiJobTrainer must enable it in its own loop)
    real_checkpoint = modeling_utils.checkpoint
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **k: checkpointed.append(1) or real_checkpoint(*a, **k))
    # B = 0 at init makes A's first gradients ~0, where Adam turns float rounding into lr-sized steps; start from
    # random adapters so the comparison measures the training, not that amplification
    randomize_adapters(trainer.jobs_model)
    for job in jobs:
        trainer.jobs_model.save_job(job.name, str(tmp_path / "init" / job.name))
    trainer.train()
    assert [r["status"] for r in trainer.job_summary] == ["done"] * 3
    assert {r["job"]: r["steps"] for r in trainer.job_summary} == {"lora": 3, "mix": 4, "dyn": 2}
    assert bool(checkpointed) == checkpointing
    # the learning rate of each job's first step, by hand: its own 2e-3 (linear decay starts at it), the trainer's
    # 1e-3, and 0 for dyn's first of one warm-up step
    first = {job.name: next(h[f"{job.name}/learning_rate"] for h in trainer.state.log_history
                            if f"{job.name}/learning_rate" in h) for job in jobs}
    assert first == {"lora": 2e-3, "mix": 1e-3, "dyn": 0.0}

    for job in jobs:
        solo = PeftModel.from_pretrained(tiny_base(vocab_size=vocab), str(tmp_path / "init" / job.name), is_trainable=True)
        solo_args = run_args(tmp_path / "solo", **OWN_SETTINGS[job.name])
        SFTTrainer(model=solo, args=solo_args, train_dataset=job.train_dataset, processing_class=tokenizer).train()
        expected = get_peft_model_state_dict(solo)
        together = load_file(os.path.join(args.output_dir, job.name, "adapter_model.safetensors"))
        initial = load_file(str(tmp_path / "init" / job.name / "adapter_model.safetensors"))
        assert expected.keys() == together.keys()
        moved = max((expected[k] - initial[k]).abs().max().item() for k in expected)
        assert moved > 1e-4, job.name  # training changed the adapter, so equality below means something
        for key in expected:
            diff = (together[key] - expected[key]).abs().max().item()
            assert diff <= 1e-5, f"{job.name}: {key} differs by {diff}"


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_router_aux_loss_is_averaged_over_the_windows_micro_batches_as_sft_trainer_does(assets, tmp_path, method):
    """Micro-batches of very different target-token counts in one window: SFTTrainer adds aux / (micro-batches in
    the window), and so must the job (before: aux weighted by each micro-batch's share of the tokens, 8e-4 off)."""
    tokenizer, _ = assets
    words = ["red", "blue", "cat", "dog", "sun", "rain", "tree", "road"]
    rows = [{"text": " ".join(words[(i + k) % 8] for k in range(2 if i % 4 < 2 else 30))} for i in range(16)]
    config = mixlora(num_experts=4, top_k=2) if method == "mixlora" else dynmole(num_experts=4)
    job = JobConfig("m", config, Dataset.from_list(rows), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    max_steps=2)
    args = run_args(tmp_path / "run", max_length=64)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], args=args,
                              processing_class=tokenizer)
    randomize_adapters(trainer.jobs_model)
    trainer.jobs_model.save_job("m", str(tmp_path / "init"))
    trainer.train()
    solo = PeftModel.from_pretrained(tiny_base(vocab_size=len(tokenizer)), str(tmp_path / "init"), is_trainable=True)
    SFTTrainer(model=solo, args=job.training_args(run_args(tmp_path / "solo", max_length=64)),
               train_dataset=job.train_dataset, processing_class=tokenizer).train()
    expected = get_peft_model_state_dict(solo)
    together = load_file(str(tmp_path / "run" / "m" / "adapter_model.safetensors"))
    routers = [key for key in expected if "router" in key]
    assert routers and max((together[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6


def test_lora_micro_batches_cut_into_rows_train_as_alone(assets, tmp_path, monkeypatch):
    """With a free step (`step_overhead_tokens=0`) every LoRA micro-batch is cut into rows and each row length runs
    in its own step, so no mixed step has padding; each job still ends exactly as trained alone (the two jobs'
    rank-4 q/v products share grouped products where their row counts differ)."""
    from peft_mole.ops import segmented_lora

    grouped = []
    real_grouped = segmented_lora.grouped_linear
    monkeypatch.setattr(segmented_lora, "grouped_linear", lambda *a: grouped.append(1) or real_grouped(*a))
    tokenizer, _ = assets
    words = ["red", "blue", "cat", "dog", "sun", "rain", "tree", "road"]
    rows = [{"text": " ".join(words[(i + k) % 8] for k in range(2 + (7 * i) % 23))} for i in range(24)]
    jobs = [
        JobConfig("a", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                  Dataset.from_list(rows), per_device_train_batch_size=4, gradient_accumulation_steps=2),
        JobConfig("b", LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
                  Dataset.from_list(rows[::-1]), per_device_train_batch_size=3, seed=3),
    ]
    vocab = len(tokenizer)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=vocab), jobs=jobs, args=run_args(tmp_path / "run"),
                              processing_class=tokenizer, step_overhead_tokens=0)
    randomize_adapters(trainer.jobs_model)
    for job in jobs:
        trainer.jobs_model.save_job(job.name, str(tmp_path / "init" / job.name))
    trainer.train()
    assert trainer.padding_stats.pad_fraction == 0.0 < trainer.padding_stats.micro_batch_pad_fraction
    assert grouped
    history = trainer.state.log_history
    for job in jobs:
        solo = PeftModel.from_pretrained(tiny_base(vocab_size=vocab), str(tmp_path / "init" / job.name), is_trainable=True)
        solo_trainer = SFTTrainer(model=solo, args=job.training_args(run_args(tmp_path / "solo")),
                                  train_dataset=job.train_dataset, processing_class=tokenizer)
        solo_trainer.train()
        # each optimizer step's loss sums the job's rows over the steps they ran in, as SFTTrainer's window loss
        solo_losses = [h["loss"] for h in solo_trainer.state.log_history if "loss" in h]
        together_losses = [h[f"{job.name}/loss"] for h in history if f"{job.name}/loss" in h]
        assert together_losses == pytest.approx(solo_losses, rel=1e-5)
        for key in ("grad_norm", "learning_rate", "epoch", "entropy", "mean_token_accuracy", "num_tokens"):  # the
            # other logged values too, step by step (before 2026-12-05, eighth session, the last three were not logged)
            solo_values = [h[key] for h in solo_trainer.state.log_history if "loss" in h]
            together_values = [h[f"{job.name}/{key}"] for h in history if f"{job.name}/loss" in h]
            assert together_values == pytest.approx(solo_values, rel=1e-4), (job.name, key)
        expected = get_peft_model_state_dict(solo)
        together = load_file(tmp_path / "run" / job.name / "adapter_model.safetensors")
        initial = load_file(tmp_path / "init" / job.name / "adapter_model.safetensors")
        assert max((expected[k] - initial[k]).abs().max().item() for k in expected) > 1e-4
        assert max((expected[k] - together[k]).abs().max().item() for k in expected) <= 1e-5, job.name


def test_lora_micro_batches_cut_into_rows_draw_their_dropout_as_whole(assets, tmp_path, monkeypatch):
    """With dropout, a run whose LoRA micro-batches are cut into rows (`step_overhead_tokens=0`, as "auto" may cut
    them by measured times) ends with the adapters of the run that keeps them whole (`None`): each piece draws its
    rows' masks as the whole micro-batch does (`MultiJobModel.drawing_pieces`). Before, the pieces drew their own
    masks (the adapters differed by about 1e-3). A forced out-of-memory retry in row halves draws alike."""
    tokenizer, _ = assets
    words = ["red", "blue", "cat", "dog", "sun", "rain", "tree", "road"]
    rows = [{"text": " ".join(words[(i + k) % 8] for k in range(2 + (7 * i) % 23))} for i in range(24)]

    def run(out, overhead):
        jobs = [JobConfig("a", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=ALL_LINEAR),
                          Dataset.from_list(rows), per_device_train_batch_size=4, gradient_accumulation_steps=2),
                JobConfig("b", LoraConfig(r=4, lora_alpha=4, lora_dropout=0.2, target_modules=["q_proj", "v_proj"]),
                          Dataset.from_list(rows[::-1]), per_device_train_batch_size=3, seed=3)]
        trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, args=run_args(out),
                                  processing_class=tokenizer, step_overhead_tokens=overhead)
        randomize_adapters(trainer.jobs_model)
        return trainer

    whole = run(tmp_path / "whole", None)
    whole.train()
    cut = run(tmp_path / "cut", 0)
    cut.train()
    assert cut.padding_stats.pad_fraction == 0.0 < whole.padding_stats.pad_fraction  # the rows did run apart
    halved = run(tmp_path / "halved", None)
    forward, failed = halved.jobs_model.forward, []

    def forward_that_runs_out_of_memory(*args, adapter_names, **kwargs):
        """After drawing its masks: the first mixed step, then each job's first micro-batch alone, fail."""
        out = forward(*args, adapter_names=adapter_names, **kwargs)
        key = "mixed" if len(set(adapter_names)) > 1 else adapter_names[0]
        if key not in failed and (key == "mixed" or len(adapter_names) == {"a": 4, "b": 3}[key]):
            failed.append(key)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return out

    monkeypatch.setattr(halved.jobs_model, "forward", forward_that_runs_out_of_memory)
    halved.train()
    assert set(failed) == {"mixed", "a", "b"}
    for job in ("a", "b"):
        expected = load_file(tmp_path / "whole" / job / "adapter_model.safetensors")
        for other in ("cut", "halved"):
            got = load_file(tmp_path / other / job / "adapter_model.safetensors")
            assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6, (job, other)


def test_stacked_jobs_train_in_one_step_under_bf16_autocast(assets, tmp_path, caplog, monkeypatch):
    """TRL's default (bf16 autocast, also on CPU): jobs sharing batched products (equal row blocks) run as one
    mixed step. The batched product's backward used to meet a bf16 gradient with fp32 factors; the step then
    failed and was silently retried job by job. (Grouped products under autocast: tests/ops/test_experts.py.)"""
    tokenizer, datasets = assets
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_LINEAR)
    jobs = [JobConfig("a", lora, datasets["sentiment"], per_device_train_batch_size=2),
            JobConfig("b", lora, datasets["capital"], per_device_train_batch_size=2),
            JobConfig("c", lora, datasets["add"], per_device_train_batch_size=2)]
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs,
                              args=run_args(tmp_path, bf16=True, max_steps=2), processing_class=tokenizer,
                              step_overhead_tokens=None)
    from peft_mole.ops import segmented_lora

    calls, stacked = [], []
    forward_backward, real_stacked = trainer._forward_backward, segmented_lora.stacked_linear
    trainer._forward_backward = lambda parts: calls.append(len(parts)) or forward_backward(parts)
    monkeypatch.setattr(segmented_lora, "stacked_linear", lambda *a: stacked.append(1) or real_stacked(*a))
    with caplog.at_level("WARNING", logger="peft_mole.multijob.trainer"):
        trainer.train()
    assert stacked and "retrying" not in caplog.text
    assert calls == [3, 3] and [r["status"] for r in trainer.job_summary] == ["done"] * 3


def test_logs_are_per_job_and_summary_is_written(assets, tmp_path):
    tokenizer, datasets = assets
    jobs = three_jobs(datasets)[:2]
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, args=run_args(tmp_path),
                              processing_class=tokenizer)
    trainer.train()
    history = trainer.state.log_history
    lora_losses = [h["lora/loss"] for h in history if "lora/loss" in h]
    mix_losses = [h["mix/loss"] for h in history if "mix/loss" in h]
    assert len(lora_losses) == 3 and len(mix_losses) == 4
    assert all(h["lora/learning_rate"] > 0 for h in history if "lora/learning_rate" in h)
    assert os.path.isfile(tmp_path / "jobs_summary.json")
    # a LoRA job is a plain PEFT LoRA adapter
    assert '"peft_type": "LORA"' in (tmp_path / "lora" / "adapter_config.json").read_text()


def test_per_job_evaluation_and_early_stopping(assets, tmp_path):
    tokenizer, datasets = assets
    jobs = [
        # a learning rate this high makes the eval loss go up and down: the job must stop at the first evaluation
        # that leaves it `patience` evaluations without a new best
        JobConfig("wild", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                  datasets["sentiment"], eval_dataset=datasets["capital"], learning_rate=0.3, eval_steps=1,
                  early_stopping_patience=2, max_steps=30),
        JobConfig("calm", mixlora(), datasets["add"], max_steps=4),
    ]
    seen = []  # what callbacks' on_evaluate receive (integrations and user callbacks watch it)

    class Watch(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(metrics["wild/eval_loss"])

    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, args=run_args(tmp_path),
                              processing_class=tokenizer, callbacks=[Watch()])
    trainer.train()
    evals = [h["wild/eval_loss"] for h in trainer.state.log_history if "wild/eval_loss" in h]
    assert seen == evals
    best, without, expected_stop = float("inf"), 0, None
    for i, loss in enumerate(evals):
        best, without = (loss, 0) if loss < best else (best, without + 1)
        if without >= 2:
            expected_stop = i + 1
            break
    assert expected_stop is not None and expected_stop < 30, evals
    summary = {r["job"]: r for r in trainer.job_summary}
    assert summary["wild"]["status"] == "stopped_early" and summary["wild"]["steps"] == expected_stop
    assert len(evals) == expected_stop
    assert summary["calm"]["status"] == "done" and summary["calm"]["steps"] == 4
    assert (tmp_path / "wild" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="early_stopping_patience needs an eval_dataset"):
        JobConfig("x", LoraConfig(r=4), datasets["add"], early_stopping_patience=2)


def test_wrapped_packing_matches_sft_trainer(assets, tmp_path):
    tokenizer, datasets = assets
    job = JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                    datasets["sentiment"], per_device_train_batch_size=2)
    args = run_args(tmp_path / "run", packing=True, packing_strategy="wrapped", max_length=32, max_steps=2)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], args=args, processing_class=tokenizer)
    randomize_adapters(trainer.jobs_model)
    trainer.jobs_model.save_job("lora", str(tmp_path / "init"))
    batch = next(iter(trainer._make_run(job).dataloader))
    assert batch["input_ids"].shape[1] == 32  # packed into full rows
    trainer.train()
    solo = PeftModel.from_pretrained(tiny_base(vocab_size=len(tokenizer)), str(tmp_path / "init"), is_trainable=True)
    SFTTrainer(model=solo, args=job.training_args(run_args(tmp_path / "solo", packing=True, packing_strategy="wrapped",
               max_length=32, max_steps=2)), train_dataset=job.train_dataset, processing_class=tokenizer).train()
    expected, together = get_peft_model_state_dict(solo), load_file(tmp_path / "run" / "lora" / "adapter_model.safetensors")
    assert max((expected[k] - together[k]).abs().max().item() for k in expected) <= 1e-5


def test_epochs_with_reshuffling_match_sft_trainer(assets, tmp_path):
    tokenizer, datasets = assets
    # 24 rows / 5 per batch = 5 micro-batches per epoch (the last one short), accumulation 2 -> 3 updates per epoch
    job = JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                    datasets["capital"], per_device_train_batch_size=5, gradient_accumulation_steps=2,
                    num_train_epochs=2, max_steps=-1)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job],
                              args=run_args(tmp_path / "run", max_steps=-1), processing_class=tokenizer)
    randomize_adapters(trainer.jobs_model)
    trainer.jobs_model.save_job("lora", str(tmp_path / "init"))
    trainer.train()
    assert trainer.job_summary[0]["steps"] == 6
    solo = PeftModel.from_pretrained(tiny_base(vocab_size=len(tokenizer)), str(tmp_path / "init"), is_trainable=True)
    solo_trainer = SFTTrainer(model=solo, args=job.training_args(run_args(tmp_path / "solo", max_steps=-1)),
                              train_dataset=job.train_dataset, processing_class=tokenizer)
    solo_trainer.train()
    assert solo_trainer.state.global_step == 6
    expected, together = get_peft_model_state_dict(solo), load_file(tmp_path / "run" / "lora" / "adapter_model.safetensors")
    assert max((expected[k] - together[k]).abs().max().item() for k in expected) <= 1e-5


def test_epoch_strategies_save_log_and_evaluate_at_each_jobs_epoch_end(assets, tmp_path):
    """save/logging/eval_strategy="epoch", per job: its own epochs end at different mixed steps."""
    tokenizer, datasets = assets
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR)
    jobs = [  # 24 rows: 6 micro-batches of 4 in 3 windows per epoch; 3 of 8 in 3 windows of 1
        JobConfig("a", lora, datasets["sentiment"], eval_dataset=datasets["capital"], per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, num_train_epochs=2),
        JobConfig("b", mixlora(), datasets["add"], per_device_train_batch_size=8, num_train_epochs=1),
    ]
    args = run_args(tmp_path, max_steps=-1, save_strategy="epoch", logging_strategy="epoch", eval_strategy="epoch")
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, args=args,
                              processing_class=tokenizer)
    trainer.train()
    assert {r["job"]: r["steps"] for r in trainer.job_summary} == {"a": 6, "b": 3}
    assert sorted(os.listdir(tmp_path / "a")).count("checkpoint-3") == 1
    assert sorted(p for p in os.listdir(tmp_path / "a") if p.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-6"]
    assert sorted(p for p in os.listdir(tmp_path / "b") if p.startswith("checkpoint-")) == ["checkpoint-3"]
    history = trainer.state.log_history
    assert [h["a/step"] for h in history if "a/loss" in h] == [3, 6]
    assert [h["a/step"] for h in history if "a/eval_loss" in h] == [3, 6]
    assert [h["b/step"] for h in history if "b/loss" in h] == [3]


def test_evaluate_reports_each_jobs_own_eval_loss(assets, tmp_path):
    """trainer.evaluate() (Trainer's API): every job with an eval_dataset, through its own adapter, as logged."""
    tokenizer, datasets = assets
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR)
    # "a": eval_steps beyond its last step, so it is evaluated once, at its end (as Trainer evaluates at the end)
    jobs = [JobConfig("a", lora, datasets["sentiment"], eval_dataset=datasets["capital"], eval_steps=3, max_steps=2),
            # the same eval set as "a": the losses differ only through the jobs' own adapters
            JobConfig("b", mixlora(), datasets["add"], eval_dataset=datasets["capital"], eval_steps=2, max_steps=2),
            JobConfig("c", lora, datasets["capital"], max_steps=2)]
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, args=run_args(tmp_path),
                              processing_class=tokenizer)
    randomize_adapters(trainer.jobs_model)
    trainer.train()
    metrics = trainer.evaluate()
    assert sorted(metrics) == ["a/eval_loss", "b/eval_loss"]
    assert [h["a/step"] for h in trainer.state.log_history[:-1] if "a/eval_loss" in h] == [2]  # (-1: evaluate())
    logged = {k: h[k] for h in trainer.state.log_history[:-1] for k in h if k.endswith("/eval_loss")}
    assert metrics == pytest.approx(logged, rel=1e-6)  # the adapters did not change since their last evaluation
    assert metrics["a/eval_loss"] != pytest.approx(metrics["b/eval_loss"], rel=1e-3)
    assert trainer.model.training  # evaluation leaves the model as it found it
    with pytest.raises(TypeError, match="each job's own eval_dataset"):
        trainer.evaluate(datasets["add"])


def test_input_tokens_seen_are_counted_as_trainer_counts_them(assets, tmp_path, monkeypatch):
    """`include_num_input_tokens_seen="non_padding"`: the real tokens of every micro-batch trained, in the logs."""
    tokenizer, datasets = assets
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=three_jobs(datasets)[:2],
                              args=run_args(tmp_path, include_num_input_tokens_seen="non_padding"),
                              processing_class=tokenizer)
    trained, next_parts = [], trainer._next_parts

    def recorded(running):
        parts = next_parts(running)
        trained.extend(int(batch["attention_mask"].sum()) for _, batch in parts)
        return parts
    monkeypatch.setattr(trainer, "_next_parts", recorded)
    trainer.train()
    assert trainer.state.num_input_tokens_seen == sum(trained) > 0
    assert trainer.state.log_history[-1]["num_input_tokens_seen"] == sum(trained)


def test_each_job_leaves_its_prompts_out_of_the_loss_as_sftrainer_alone_decides(assets, tmp_path):
    """SFTTrainer decides `completion_only_loss=None` from its train dataset's rows; given the first job's (plain
    text), it used to prepare a later prompt-completion job's train and eval rows with their prompts trained.
    Each job's labels (train and eval) now equal those a plain SFTTrainer on its own data makes."""
    tokenizer, datasets = assets
    text = Dataset.from_list([{"text": f"{r['prompt']} {r['completion']}"} for r in datasets["add"]])
    jobs = [JobConfig("text", LoraConfig(r=4, target_modules=["q_proj"]), text, eval_dataset=text.select(range(4))),
            JobConfig("pc", LoraConfig(r=4, target_modules=["q_proj"]), datasets["capital"],
                      eval_dataset=datasets["capital"].select(range(4))),
            JobConfig("pc_eval_first", LoraConfig(r=4, target_modules=["q_proj"]), text,
                      eval_dataset=datasets["sentiment"].select(range(4)))]
    for order in (jobs, jobs[1:] + jobs[:1]):  # a prompt-completion job first: the text job trains every token
        trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=order, processing_class=tokenizer,
                                  args=run_args(tmp_path / "run", eval_strategy="steps", eval_steps=10))
        for job in order:
            alone = SFTTrainer(model=tiny_base(vocab_size=len(tokenizer)), processing_class=tokenizer,
                               args=run_args(tmp_path / "alone", eval_strategy="steps", eval_steps=10),
                               train_dataset=job.train_dataset, eval_dataset=job.eval_dataset)
            assert trainer.job_datasets[job.name]["labels"] == alone.train_dataset["labels"], job.name
            assert trainer.job_eval_datasets[job.name]["labels"] == alone.eval_dataset["labels"], job.name
        masked = sum(label == -100 for row in trainer.job_datasets["pc"]["labels"] for label in row)
        assert masked > 0  # the prompts are left out


def test_a_jobs_folder_loads_alone_as_an_sfttrainer_output_does(assets, tmp_path):
    """Each job's folder names its base (`base_model_name_or_path`), has a model card and the tokenizer, so
    `AutoPeftModelForCausalLM` and `AutoTokenizer` load it alone (the config named no base: "Cannot infer the auto
    class"); the model equals the base with the adapter loaded by hand."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, datasets = assets
    tiny_base(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    jobs = [JobConfig("lora", LoraConfig(r=4, target_modules=["q_proj"]), datasets["add"], max_steps=1),
            JobConfig("mix", mixlora(), datasets["capital"], max_steps=1)]
    trainer = MultiJobTrainer(model=AutoModelForCausalLM.from_pretrained(tmp_path / "base"), jobs=jobs,
                              processing_class=tokenizer, args=run_args(tmp_path / "run"))
    randomize_adapters(trainer.jobs_model)
    trainer.train()
    ids = torch.tensor([tokenizer("a b c")["input_ids"]])
    for job in ("lora", "mix"):
        folder = tmp_path / "run" / job
        loaded = AutoPeftModelForCausalLM.from_pretrained(folder)
        by_hand = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(folder))
        assert torch.equal(loaded(input_ids=ids).logits, by_hand(input_ids=ids).logits)
        assert AutoTokenizer.from_pretrained(folder)("a b c")["input_ids"] == ids[0].tolist()
        card = (folder / "README.md").read_text()
        assert "library_name: peft" in card and f"base_model: {tmp_path / 'base'}" in card, card[:300]


@pytest.mark.parametrize("padding_free", [False, True])
def test_a_jobs_eval_loss_is_sfttrainers_eval_loss(assets, tmp_path, padding_free):
    """A job's eval loss equals SFTTrainer's `eval_loss` on its saved adapter with the same eval batch size: each
    batch's token mean, averaged over examples (eval rows of different target lengths, a last batch of 1 row; before,
    the mean over all target tokens: 3e-4 relative apart in a helper's probe). Padding-free, a batch packed into one
    row still counts once per example it holds, as Trainer counts it."""
    tokenizer, datasets = assets
    prompts = datasets["sentiment"]["prompt"][:13]  # completions of 1 to 13 words
    evaluation = Dataset.from_list([{"prompt": p, "completion": " " + " ".join(["good"] * (1 + i))}
                                    for i, p in enumerate(prompts)])
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR)
    job = JobConfig("a", lora, datasets["capital"], eval_dataset=evaluation, max_steps=2)
    settings = dict(per_device_eval_batch_size=4, padding_free=padding_free, max_length=None if padding_free else 40)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], processing_class=tokenizer,
                              args=run_args(tmp_path / "run", **settings))
    randomize_adapters(trainer.jobs_model)
    trainer.train()
    together = trainer.evaluate()["a/eval_loss"]
    solo = PeftModel.from_pretrained(tiny_base(vocab_size=len(tokenizer)), str(tmp_path / "run" / "a"))
    alone = SFTTrainer(model=solo, args=job.training_args(run_args(tmp_path / "solo", **settings)),
                       train_dataset=job.train_dataset, eval_dataset=evaluation, processing_class=tokenizer)
    assert together == pytest.approx(alone.evaluate()["eval_loss"], rel=1e-6)
