"""SFTConfig options that shape a job's data or loss take effect per job, as in a plain SFTTrainer run on that job
alone: the router aux loss coefficient, `shuffle_dataset` with the job's seed, `eval_packing`, and the
length-grouped sampler with the job's batch size (each was the trainer's, or ignored, before 2026-12-05)."""

from __future__ import annotations

import pytest
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from trl import SFTTrainer

from peft_mole import JobConfig, MultiJobTrainer
from tests.helpers import dynmole, mixlora, one_layer_base, randomize_adapters, tiny_base
from tests.multijob.test_trainer import run_args

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def _together_and_alone(tokenizer, jobs, tmp_path, **options) -> dict[str, float]:
    """{job: max |together − alone|} over its adapter's tensors, after training all jobs together and each alone
    with SFTTrainer from the same initial adapter."""
    vocab = len(tokenizer)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=vocab), jobs=jobs, processing_class=tokenizer,
                              args=run_args(tmp_path / "run", **options))
    randomize_adapters(trainer.jobs_model)
    for job in jobs:
        trainer.jobs_model.save_job(job.name, str(tmp_path / "init" / job.name))
    trainer.train()
    differences = {}
    for job in jobs:
        solo = PeftModel.from_pretrained(tiny_base(vocab_size=vocab), str(tmp_path / "init" / job.name),
                                         is_trainable=True)
        SFTTrainer(model=solo, args=job.training_args(run_args(tmp_path / "solo", **options)),
                   train_dataset=job.train_dataset, eval_dataset=job.eval_dataset, processing_class=tokenizer).train()
        expected = get_peft_model_state_dict(solo)
        together = load_file(str(tmp_path / "run" / job.name / "adapter_model.safetensors"))
        differences[job.name] = max((together[k] - expected[k]).abs().max().item() for k in expected)
    return differences


@pytest.mark.parametrize("coefficient", [0.0, 0.5])
def test_router_aux_loss_coef_scales_each_jobs_aux_loss(assets, tmp_path, coefficient):
    # (before: ignored, and 0.5 refused by SFTTrainer's check for a Mixture-of-Experts base)
    tokenizer, datasets = assets
    jobs = [JobConfig("m", mixlora(), datasets["capital"], per_device_train_batch_size=3),
            JobConfig("d", dynmole(), datasets["add"], per_device_train_batch_size=2)]
    differences = _together_and_alone(tokenizer, jobs, tmp_path, router_aux_loss_coef=coefficient)
    assert max(differences.values()) <= 1e-5, differences


def test_shuffle_dataset_shuffles_each_job_with_its_own_seed(assets, tmp_path):
    tokenizer, datasets = assets
    jobs = [JobConfig("a", LoraConfig(**LORA), datasets["sentiment"], seed=5),  # (the first job is re-prepared)
            JobConfig("b", LoraConfig(**LORA), datasets["capital"], seed=7)]
    differences = _together_and_alone(tokenizer, jobs, tmp_path, shuffle_dataset=True)
    assert max(differences.values()) <= 1e-5, differences


def test_shuffle_dataset_shuffles_a_jobs_eval_set_with_its_own_seed(assets, tmp_path):
    """The first eval set is prepared by SFTTrainer's `__init__` with the trainer's seed; a job with its own seed
    gets its eval set shuffled with that seed, as SFTTrainer on the job alone (it reused the trainer's order)."""
    tokenizer, datasets = assets
    job = JobConfig("a", LoraConfig(**LORA), datasets["sentiment"], eval_dataset=datasets["capital"], seed=5)
    args = run_args(tmp_path / "run", shuffle_dataset=True)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], processing_class=tokenizer,
                              args=args)
    solo = SFTTrainer(model=tiny_base(vocab_size=len(tokenizer)), processing_class=tokenizer,
                      args=job.training_args(run_args(tmp_path / "solo", shuffle_dataset=True)),
                      train_dataset=job.train_dataset, eval_dataset=job.eval_dataset)
    ours, theirs = trainer.job_eval_datasets["a"]["input_ids"], solo.eval_dataset["input_ids"]
    assert ours == theirs and ours != trainer.eval_dataset["input_ids"]  # (the trainer's seed gives another order)


@pytest.mark.parametrize(("packing", "eval_packing"), [(True, False), (False, True)])
def test_eval_packing_decides_every_jobs_eval_set(assets, tmp_path, packing, eval_packing):
    tokenizer, datasets = assets

    def text(rows):
        return Dataset.from_list([{"text": r["prompt"] + r["completion"]} for r in rows])

    jobs = [JobConfig(name, LoraConfig(**LORA), text(datasets[task]), eval_dataset=text(datasets[task]).select(range(8)))
            for name, task in (("a", "sentiment"), ("b", "add"))]
    options = dict(packing=packing, packing_strategy="wrapped", eval_packing=eval_packing, max_length=32)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                              args=run_args(tmp_path / "run", **options))
    for job in jobs:
        solo = SFTTrainer(model=tiny_base(vocab_size=len(tokenizer)), processing_class=tokenizer,
                          args=job.training_args(run_args(tmp_path / "solo", **options)),
                          train_dataset=job.train_dataset, eval_dataset=job.eval_dataset)
        assert trainer.job_eval_datasets[job.name]["input_ids"] == solo.eval_dataset["input_ids"], job.name
    assert (len(trainer.job_eval_datasets["b"]) < 8) == eval_packing  # packed: fewer, longer rows


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_length_aware_samplers_take_the_jobs_batch_size(assets, tmp_path, strategy):
    tokenizer, datasets = assets
    jobs = [JobConfig("a", LoraConfig(**LORA), datasets["sentiment"], per_device_train_batch_size=2),
            JobConfig("b", LoraConfig(**LORA), datasets["capital"], per_device_train_batch_size=6,
                      gradient_accumulation_steps=2)]
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                              args=run_args(tmp_path / "run", train_sampling_strategy=strategy))
    runs = {job.name: trainer._make_run(job) for job in jobs}
    assert trainer.args.per_device_train_batch_size == 4  # the trainer's own, restored after each job's loader
    for name, per_batch in (("a", 2), ("b", 12)):  # the sampler's batch: the job's batch × accumulation
        loader = runs[name].dataloader
        sampler = getattr(loader, "base_dataloader", loader).batch_sampler
        sampler = getattr(sampler, "batch_sampler", sampler)  # (accelerate's shard wrapper, if any)
        sampler = getattr(sampler, "sampler", sampler)
        size = sampler.batch_size if strategy == "group_by_length" else sampler.effective_batch_size
        assert size == per_batch, (name, size)


def test_predict_and_push_to_hub_are_refused_and_rows_as_dicts_are_a_dataset(assets, tmp_path):
    tokenizer, datasets = assets
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in datasets["add"]]
    job = JobConfig("a", LoraConfig(**LORA), rows)
    assert isinstance(job.train_dataset, Dataset) and len(job.train_dataset) == len(rows)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], processing_class=tokenizer,
                              args=run_args(tmp_path / "run"))
    with pytest.raises(NotImplementedError, match="each job is its own adapter"):
        trainer.predict(datasets["add"])
    with pytest.raises(NotImplementedError, match=r"peft_mole.push_to_hub\(PeftModel.from_pretrained"):
        trainer.push_to_hub()


@pytest.mark.parametrize("eval_on_start", [False, True])
def test_length_grouped_order_of_every_job_is_its_run_alone_in_every_epoch(assets, tmp_path, eval_on_start):
    """`group_by_length`'s sampler draws its permutation from torch's global generator when an epoch begins; each
    job draws it from a state of its own, seeded as SFTTrainer seeds (`multijob.data_order`). Before: only the first
    job's first epoch had its solo order (the others drew where other jobs' fetches had left the generator; 1e-2).
    `eval_on_start`: a run alone draws its eval loader's base seed before its first epoch; so does each job."""
    tokenizer, datasets = assets
    evals = {name: datasets[name].select(range(6)) if eval_on_start else None for name in datasets}
    jobs = [JobConfig("a", LoraConfig(**LORA), datasets["sentiment"], evals["sentiment"],
                      per_device_train_batch_size=2),
            JobConfig("b", LoraConfig(**LORA), datasets["capital"], evals["capital"],
                      per_device_train_batch_size=3, seed=4),
            JobConfig("m", mixlora(), datasets["add"], evals["add"], per_device_train_batch_size=4)]
    differences = _together_and_alone(tokenizer, jobs, tmp_path, train_sampling_strategy="group_by_length",
                                      max_steps=-1, num_train_epochs=2, eval_on_start=eval_on_start)
    assert max(differences.values()) <= 1e-6, differences


def test_each_epoch_reaches_a_batch_sampler_inside_accelerates_shard(assets, tmp_path):
    """On several processes accelerate wraps a batch sampler (`batch_rebalance`) in its `BatchSamplerShard`, which
    `DataLoaderShard.set_epoch` does not reach; Trainer sets its epoch itself, and so does each job (before: every
    epoch of a job repeated its first epoch's order on several processes)."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard

    tokenizer, datasets = assets
    job = JobConfig("a", LoraConfig(**LORA), datasets["sentiment"], per_device_train_batch_size=2)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], processing_class=tokenizer,
                              args=run_args(tmp_path / "run", train_sampling_strategy="batch_rebalance"))
    run = trainer._make_run(job)
    rebalance = run.dataloader.batch_sampler
    # the loader of process 0 of 2, as accelerate prepares it there
    run.dataloader = DataLoaderShard(trainer.job_datasets["a"], batch_sampler=BatchSamplerShard(rebalance, 2, 0),
                                     collate_fn=run.dataloader.collate_fn)
    run.epoch = 1
    run._start_epoch()
    assert rebalance.epoch == 1


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_compile_backend_of_the_accelerate_config_compiles_the_mixed_steps(assets, tmp_path, monkeypatch, dynamic):
    """`accelerate launch --dynamo_backend aot_eager` compiles the model Trainer's Accelerator prepares; the mixed
    steps compile as with `torch_compile=True` and that backend (before: ignored, the steps ran eagerly).
    `--dynamo_use_dynamic true`: rows and length dynamic from the first graph (`dynamic_steps`), one graph for the
    steps of varying shape of a LoRA and a MixLoRA job; false (`accelerate config`'s default answer) is no request:
    the trainer's rule, which takes them dynamic too (the two jobs' micro-batches differ in width; were it passed on
    as torch.compile's `dynamic=False`, as before 2026-12-07, every new shape would compile a graph)."""
    import torch
    from accelerate.utils import TorchDynamoPlugin
    from torch._dynamo.utils import counters

    from peft_mole.multijob.trainer_args import take_accelerate_compile

    tokenizer, datasets = assets
    jobs = [JobConfig("a", LoraConfig(**LORA), datasets["sentiment"]), JobConfig("m", mixlora(), datasets["add"])]
    trainer = MultiJobTrainer(model=one_layer_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                              args=run_args(tmp_path, max_steps=2))
    assert not trainer.args.torch_compile  # (the accelerate state of this process has no backend)
    plugin = TorchDynamoPlugin(backend="aot_eager", dynamic=dynamic)
    monkeypatch.setattr(trainer.accelerator.state, "dynamo_plugin", plugin)
    take_accelerate_compile(trainer)
    assert (trainer.args.torch_compile, trainer.args.torch_compile_backend) == (True, "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    trainer.train()
    assert counters["stats"]["unique_graphs"] == 1
    assert trainer.jobs_model.__dict__["_compile_kwargs"].get("dynamic") is (True if dynamic else None)
    assert trainer.jobs_model.__dict__["_dynamic_steps"]


def test_assistant_only_loss_refuses_a_later_job_whose_data_is_not_conversational(assets, tmp_path):
    """SFTTrainer refuses `assistant_only_loss=True` on plain text, but checks only the train dataset it is given:
    the first job's. A later plain-text job was accepted and trained on every token (before 2026-12-07)."""
    from peft_mole import synthetic

    tokenizer = synthetic.demo_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
                               "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }} "
                               "{% endif %}{% endfor %}")
    chat = Dataset.from_list([{"messages": [{"role": "user", "content": "capital of Peru?"},
                                            {"role": "assistant", "content": "Lima"}]}] * 8)
    text = Dataset.from_list([{"text": "capital of Peru? Lima"}] * 8)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    args = run_args(tmp_path, assistant_only_loss=True)
    with pytest.raises(ValueError, match="job 'plain': assistant_only_loss=True needs a conversational dataset"):
        MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), args=args, processing_class=tokenizer,
                        jobs=[JobConfig("chat", lora, chat), JobConfig("plain", lora, text)])
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), args=args, processing_class=tokenizer,
                              jobs=[JobConfig("chat", lora, chat), JobConfig("chat2", lora, chat)])
    row = trainer.job_datasets["chat2"][0]
    assert 0 < sum(label != -100 for label in row["labels"]) < len(row["input_ids"])  # the assistant's tokens train
