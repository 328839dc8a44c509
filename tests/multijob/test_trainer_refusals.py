"""Arguments MultiJobTrainer refuses, early and by name: bad jobs or inputs, and Trainer options its own loop cannot
honour (they were silently ignored, or crashed the run at its first step)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig
from transformers import EarlyStoppingCallback

from peft_mole import JobConfig, MultiJobTrainer
from tests.helpers import tiny_base
from tests.multijob.test_trainer import ALL_LINEAR, run_args, three_jobs


def test_bad_trainer_arguments(assets, tmp_path):
    tokenizer, datasets = assets
    job = three_jobs(datasets)[0]
    with pytest.raises(ValueError, match="used more than once"):
        MultiJobTrainer(model=tiny_base(), jobs=[job, job], args=run_args(tmp_path), processing_class=tokenizer)
    upper = dataclasses.replace(job, name=job.name.upper())  # one folder on macOS and Windows (2026-12-08)
    with pytest.raises(ValueError, match=rf"unique, whatever their case .*\['{job.name.upper()}', '{job.name}'\]"):
        MultiJobTrainer(model=tiny_base(), jobs=[job, upper], args=run_args(tmp_path), processing_class=tokenizer)
    with pytest.raises(TypeError, match="non-empty list of JobConfig"):
        MultiJobTrainer(model=tiny_base(), jobs=[], args=run_args(tmp_path), processing_class=tokenizer)
    with pytest.raises(TypeError, match="not peft_config"):
        MultiJobTrainer(model=tiny_base(), jobs=[job], args=run_args(tmp_path), peft_config=LoraConfig())
    with pytest.raises(TypeError, match="each job's train_dataset and eval_dataset"):  # it would be ignored
        MultiJobTrainer(model=tiny_base(), jobs=[job], args=run_args(tmp_path), eval_dataset=datasets["add"])
    with pytest.raises(ValueError, match="EarlyStoppingCallback.*JobConfig\\(early_stopping_patience"):
        MultiJobTrainer(model=tiny_base(), jobs=[job], args=run_args(tmp_path), processing_class=tokenizer,
                        callbacks=[EarlyStoppingCallback(early_stopping_patience=1)])
    with pytest.raises(ValueError, match="job 'late': lr_scheduler_type='reduce_lr_on_plateau'"):
        JobConfig("late", LoraConfig(r=4), datasets["add"], lr_scheduler_type="reduce_lr_on_plateau")
    with pytest.raises(TypeError, match="job 'stream': train_dataset must have a length .* IterableDataset"):
        JobConfig("stream", LoraConfig(r=4), datasets["add"].to_iterable_dataset())


@pytest.mark.parametrize("option", [dict(neftune_noise_alpha=5.0), dict(auto_find_batch_size=True),
                                    dict(push_to_hub=True, hub_model_id="me/x"), dict(use_liger_kernel=True),
                                    dict(label_smoothing_factor=0.1), dict(loss_type="dft"),
                                    dict(activation_offloading=True), dict(accelerator_config={"even_batches": False}),
                                    dict(accelerator_config={"dispatch_batches": True}),
                                    dict(gradient_checkpointing_kwargs={"use_reentrant": True}),
                                    dict(torch_compile=True, gradient_checkpointing_kwargs={"context_fn": dict}),
                                    dict(lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps"),
                                    dict(ignore_data_skip=True),  # (silently ignored before 2026-12-07)
                                    dict(save_on_each_node=True),  # (taken before 2026-12-08: see limits)
                                    dict(optim="schedule_free_adamw"), dict(optim="galore_adamw")])  # (at train())
def test_trainer_options_its_own_loop_cannot_honour_are_refused(assets, tmp_path, option):
    """Trainer.train would apply these; MultiJobTrainer's loop does not, so they fail early instead of silently."""
    tokenizer, datasets = assets
    field = next(iter(option))  # use_reentrant=True: torch.autograd.grad would give the adapters no gradient
    try:
        args = run_args(tmp_path, **option)
    except (ImportError, ValueError) as error:  # e.g. use_liger_kernel without liger-kernel installed
        pytest.skip(f"SFTConfig itself refuses {field} here: {error}")
    with pytest.raises(ValueError, match=f"does not support {field}="):
        MultiJobTrainer(model=tiny_base(), jobs=three_jobs(datasets)[:1], args=args, processing_class=tokenizer)


def test_optimizers_the_jobs_would_not_use_are_refused(assets, tmp_path):
    """`optimizers=`, `optimizer_cls_and_kwargs=` and a subclass's `create_optimizer` were accepted and never used:
    every job trained with the `optim` of its arguments (an SGD asked for, AdamW run)."""
    tokenizer, datasets = assets
    job = three_jobs(datasets)[:1]
    adapter = torch.nn.Linear(2, 2)
    given = {"optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 0.5}),
             "optimizers": (torch.optim.SGD(adapter.parameters(), lr=0.5), None)}
    for field, value in given.items():
        with pytest.raises(ValueError, match=f"does not support {field}: every job gets an optimizer"):
            MultiJobTrainer(model=tiny_base(), jobs=job, args=run_args(tmp_path), processing_class=tokenizer,
                            **{field: value})

    class OwnOptimizer(MultiJobTrainer):
        def create_optimizer(self, model=None):
            return torch.optim.SGD(self.model.parameters(), lr=0.5)

    with pytest.raises(ValueError, match="OwnOptimizer overrides create_optimizer, which MultiJobTrainer never calls"):
        OwnOptimizer(model=tiny_base(), jobs=job, args=run_args(tmp_path), processing_class=tokenizer)


def test_losses_the_mixed_step_would_not_compute_are_refused(assets, tmp_path):
    """`compute_loss_func=` and a subclass's compute_loss / training_step / prediction_step were accepted and never
    called before 2026-12-08 (found by a review): every job trained on the mean token NLL instead."""
    tokenizer, datasets = assets
    job = three_jobs(datasets)[:1]
    with pytest.raises(ValueError, match="does not support compute_loss_func: its mixed step computes each job's"):
        MultiJobTrainer(model=tiny_base(), jobs=job, args=run_args(tmp_path), processing_class=tokenizer,
                        compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss * 2)
    for hook in ("compute_loss", "training_step", "prediction_step"):
        own = type("OwnLoss", (MultiJobTrainer,), {hook: lambda self, *args, **kwargs: None})
        with pytest.raises(ValueError, match=f"OwnLoss overrides {hook}, which MultiJobTrainer never calls"):
            own(model=tiny_base(), jobs=job, args=run_args(tmp_path), processing_class=tokenizer)


def test_the_trainers_max_steps_of_zero_is_refused(assets, tmp_path):
    """`SFTConfig(max_steps=0)` trains no step in Trainer (transformers 5: epochs only for a negative value);
    MultiJobTrainer trained every job by epochs instead (before 2026-12-07). A job's own 0 was refused already."""
    tokenizer, datasets = assets
    with pytest.raises(ValueError, match="trainer arguments: max_steps must be an int >= 1 \\(or -1 for epochs\\)"):
        MultiJobTrainer(model=tiny_base(), jobs=three_jobs(datasets)[:1], args=run_args(tmp_path, max_steps=0),
                        processing_class=tokenizer)


def test_a_model_that_is_not_a_base_model_or_its_path_is_refused(assets, tmp_path):
    tokenizer, datasets = assets
    jobs = [JobConfig("a", LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR), datasets["add"])]
    for model in (None, 3):  # (None was an AttributeError from PEFT, deep in building the jobs' model)
        with pytest.raises(TypeError, match="model must be a base model .* or its path or hub id, got"):
            MultiJobTrainer(model=model, jobs=jobs, args=run_args(tmp_path), processing_class=tokenizer)


def test_a_jobs_scheduler_that_refuses_the_trainers_kwargs_fails_when_made_and_takes_its_own(assets, tmp_path):
    """The trainer's cosine_with_min_lr needs its `min_lr`, which a job's "linear" refuses: refused when the trainer
    is made, naming the job (it was a TypeError at train(), which no job survived). A job's own
    `lr_scheduler_kwargs` fix it, and each job ends on its own schedule's last rate."""
    tokenizer, datasets = assets
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    args = run_args(tmp_path, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-4})
    with pytest.raises(ValueError, match=r"job 'b': lr_scheduler_type='linear' cannot be built with the trainer's "
                                         r"lr_scheduler_kwargs=\{'min_lr': 0.0001\}.*min_lr"):
        MultiJobTrainer(model=tiny_base(), args=args, processing_class=tokenizer,
                        jobs=[JobConfig("a", lora, datasets["add"]),
                              JobConfig("b", lora, datasets["add"], lr_scheduler_type="linear")])
    with pytest.raises(ValueError, match="job 'a': lr_scheduler_type='cosine_with_min_lr' cannot be built with its"):
        MultiJobTrainer(model=tiny_base(), args=args, processing_class=tokenizer,
                        jobs=[JobConfig("a", lora, datasets["add"], lr_scheduler_kwargs={})])
    with pytest.raises(TypeError, match="job 'c': lr_scheduler_kwargs must be a dict"):
        JobConfig("c", lora, datasets["add"], lr_scheduler_kwargs="min_lr=1e-4")
    jobs = [JobConfig("a", lora, datasets["add"]),
            JobConfig("b", lora, datasets["add"], lr_scheduler_type="linear", lr_scheduler_kwargs={}),
            JobConfig("c", lora, datasets["add"], lr_scheduler_kwargs={"min_lr": 5e-4})]
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), args=args, processing_class=tokenizer,
                              jobs=jobs)
    trainer.train()
    last = {run.name: run.scheduler.get_last_lr()[0] for run in trainer.runs}
    assert last == pytest.approx({"a": 1e-4, "b": 0.0, "c": 5e-4}, abs=1e-12)
