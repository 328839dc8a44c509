"""Bad-input matrix, multi-job data and jobs: each problem is named with its job and what is allowed."""

from __future__ import annotations

import pytest
from datasets import Dataset
from peft import LoraConfig

from peft_mole import JobConfig, MultiJobTrainer, synthetic
from tests.helpers import mixlora, tiny_base
from tests.multijob.test_trainer import run_args

LORA = LoraConfig(r=4, target_modules=["q_proj"])


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic.demo_tokenizer()


def rows(n=8, **extra):
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"], **extra}
                              for r in synthetic.multitask_rows(n, tasks=("add",))])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(train_dataset=Dataset.from_list([])), ValueError, "job 'j': train_dataset is empty"),
        (dict(train_dataset=None), ValueError, "train_dataset is required"),
        (dict(learning_rate=0), ValueError, "learning_rate must be a finite number > 0"),
        (dict(per_device_train_batch_size=0), ValueError, "per_device_train_batch_size must be an int >= 1"),
        (dict(gradient_accumulation_steps="2"), ValueError, "gradient_accumulation_steps must be an int >= 1"),
        (dict(max_steps=0), ValueError, "max_steps must be an int >= 1"),
        (dict(priority="high"), TypeError, "priority must be an int"),
        (dict(early_stopping_patience=2), ValueError, "early_stopping_patience needs an eval_dataset"),
        (dict(early_stopping_patience=0, eval_dataset=rows()), ValueError, "early_stopping_patience must be an int >= 1"),
        (dict(early_stopping_patience=True, eval_dataset=rows()), ValueError,   # (taken as 1 before 2026-12-06)
         "early_stopping_patience must be an int >= 1, got True"),
        (dict(name="a/b"), ValueError, "job name 'a/b' is not allowed"),
        (dict(name="__base__"), ValueError, "reserved"),
        (dict(peft_config={"r": 4}), TypeError, "peft_config must be a LoraConfig, MixLoRAConfig or DynMoLEConfig"),
        # each accepted before 2026-12-05 and failed in train(), or trained nothing, or a NaN loss
        (dict(num_train_epochs=0), ValueError, "num_train_epochs must be a finite number > 0"),
        (dict(num_train_epochs="2"), ValueError, "num_train_epochs must be a finite number > 0"),
        (dict(weight_decay="0.1"), ValueError, "weight_decay must be a finite number >= 0"),
        (dict(seed="x"), ValueError, "seed must be an int >= 0"),
        (dict(learning_rate=True), ValueError, "learning_rate must be a finite number > 0"),
        (dict(learning_rate=float("inf")), ValueError, "learning_rate must be a finite number > 0"),
        (dict(max_steps=True), ValueError, "max_steps must be an int >= 1"),
        (dict(save_steps=-1), ValueError, "save_steps must be a finite number > 0"),
        (dict(logging_steps=-1), ValueError, "logging_steps must be a finite number > 0"),
        (dict(eval_steps=-1), ValueError, "eval_steps must be a finite number >= 0"),
        # (since 2026-12-07: truncated to every 2 steps before; SFTConfig refuses it)
        (dict(logging_steps=2.5), ValueError, "logging_steps must be an integer if bigger than 1"),
        (dict(eval_steps=3.5), ValueError, "eval_steps must be an integer if bigger than 1"),
        (dict(save_steps=1.5), ValueError, "save_steps must be an integer if bigger than 1"),
        (dict(eval_dataset="x.jsonl"), TypeError, "eval_dataset must be a dataset"),
        (dict(eval_dataset=Dataset.from_list([])), ValueError, "eval_dataset is empty"),
        (dict(name="train"), ValueError, "job name 'train' is not allowed: it is an attribute of torch modules"),
        (dict(name="to"), ValueError, "job name 'to' is not allowed"),
        (dict(name="get"), ValueError, "job name 'get' is not allowed"),  # (attention LoRA's ParameterDict)
    ],
)
def test_bad_job_configs(kwargs, error, match):
    settings = dict(name="j", peft_config=LORA, train_dataset=rows())
    settings.update(kwargs)
    with pytest.raises(error, match=match):
        JobConfig(**settings)


def test_rows_without_trainable_tokens_leave_no_data(tokenizer, tmp_path):
    # the prompt fills max_length, so truncation cuts the whole completion: no row has a trainable token
    cut_answers = Dataset.from_list([{"prompt": "word " * 60, "completion": " yes"}] * 4)
    jobs = [JobConfig("ok", LORA, rows()), JobConfig("blank", mixlora(), cut_answers)]
    with pytest.raises(ValueError, match="job 'blank': no training rows are left"):
        MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, args=run_args(tmp_path, max_length=24),
                        processing_class=tokenizer)


@pytest.mark.parametrize("first", [False, True], ids=["second-job", "first-job"])
def test_missing_text_field_names_the_job_the_field_and_the_columns(tokenizer, tmp_path, first):
    """The first job's dataset is prepared by SFTTrainer's own `__init__`: before, its error was a bare "'text'"."""
    wrong = Dataset.from_list([{"content": "no text or prompt field"}] * 4)
    jobs = [JobConfig("ok", LORA, rows()), JobConfig("wrong", mixlora(), wrong)]
    with pytest.raises(ValueError, match=r"job 'wrong'.*: the dataset has no field 'text' \(its columns: "
                                         r"\['content'\]\); SFTTrainer reads 'text' \(args.dataset_text_field\)"):
        MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs[::-1] if first else jobs,
                        args=run_args(tmp_path), processing_class=tokenizer)


def test_rows_longer_than_max_length_are_truncated_and_train(tokenizer, tmp_path):
    long_rows = Dataset.from_list([{"text": "one two three four five " * 40}] * 8)
    jobs = [JobConfig("long", LORA, long_rows, max_steps=2)]
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs,
                              args=run_args(tmp_path, max_length=24), processing_class=tokenizer)
    assert max(len(ids) for ids in trainer.job_datasets["long"]["input_ids"]) == 24
    trainer.train()
    assert trainer.job_summary[0]["status"] == "done" and trainer.job_summary[0]["tokens"] == 2 * 4 * 23


def test_a_job_too_small_for_one_batch_with_drop_last_is_named(tokenizer, tmp_path):
    """Before, it failed during the run with "its data pipeline raised IndexError" (the other jobs went on)."""
    jobs = [JobConfig("ok", LORA, rows()), JobConfig("tiny", LORA, rows(3), per_device_train_batch_size=4)]
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                              args=run_args(tmp_path, dataloader_drop_last=True))
    with pytest.raises(ValueError, match="job 'tiny': its 3 rows make no batch of per_device_train_batch_size=4"):
        trainer.train()


def test_a_streaming_eval_set_and_eval_steps_0_are_accepted():
    """An eval set needs no length (it is only iterated); eval_steps=0 means every logging_steps, as in
    TrainingArguments."""
    job = JobConfig("j", LORA, rows(), eval_dataset=rows().to_iterable_dataset(), eval_steps=0)
    assert job.eval_steps == 0 and not hasattr(job.eval_dataset, "__len__")


@pytest.mark.parametrize("adapted_by", ["get_peft_model", "load_adapter"])
def test_a_base_that_holds_adapter_layers_is_refused_and_its_unloaded_base_trains(tokenizer, tmp_path, adapted_by):
    """SFTTrainer(peft_config=...) adapts the base model itself (get_peft_model): a MultiJobTrainer on that base
    then failed every job at its first step ("2 adapters are active") and train() returned (a docs audit,
    2026-12-06, seventeenth session: the quickstart reused `base`)."""
    from peft import get_peft_model

    base = tiny_base(vocab_size=len(tokenizer))
    if adapted_by == "get_peft_model":
        peft_model = get_peft_model(base, mixlora())
    else:
        get_peft_model(tiny_base(vocab_size=len(tokenizer)), LORA).save_pretrained(tmp_path / "saved")
        base.load_adapter(str(tmp_path / "saved"), adapter_name="saved")
    with pytest.raises(ValueError, match=r"model already holds adapter layers \(adapters \['(default|saved)'\]\)"):
        MultiJobTrainer(model=base, jobs=[JobConfig("ok", LORA, rows())], args=run_args(tmp_path / "run"),
                        processing_class=tokenizer)
    if adapted_by == "get_peft_model":
        trainer = MultiJobTrainer(model=peft_model.unload(), jobs=[JobConfig("ok", LORA, rows(), max_steps=2)],
                                  args=run_args(tmp_path / "run"), processing_class=tokenizer)
        trainer.train()
        assert trainer.job_summary[0]["status"] == "done"
