"""`JobConfig(init_adapter=folder)`: a job goes on from a saved adapter (a job's output or any PEFT LoRA / peft-mole
adapter), as `PeftModel.from_pretrained(base, folder, is_trainable=True)` starts SFTTrainer."""

from __future__ import annotations

import pytest
import torch
import yaml
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from peft_mole import JobConfig, MultiJobTrainer, synthetic
from peft_mole.multijob.job_file import parse_run
from tests.helpers import mixlora, tiny_base
from tests.multijob.test_trainer import run_args

LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def rows(n: int = 4) -> Dataset:
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                              for r in synthetic.multitask_rows(n, tasks=("add",))])


@pytest.fixture
def saved_lora(tmp_path) -> str:
    folder = tmp_path / "saved-lora"
    get_peft_model(tiny_base(), LORA).save_pretrained(folder)
    return str(folder)


def train(folder, tokenizer, steps: int, init: dict[str, str] | None = None) -> MultiJobTrainer:
    """A LoRA and a MixLoRA job, plain SGD at a constant rate, one batch of the same 4 rows per step."""
    init = init or {}
    jobs = [JobConfig("lora", None if "lora" in init else LORA, rows(), init_adapter=init.get("lora")),
            JobConfig("mix", None if "mix" in init else mixlora(), rows(), init_adapter=init.get("mix"))]
    return MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                           args=run_args(folder, max_steps=steps, optim="sgd", learning_rate=0.5,
                                         lr_scheduler_type="constant"))


def test_two_steps_then_two_more_from_the_saved_adapters_equal_four_steps(tmp_path):
    tokenizer = synthetic.demo_tokenizer()
    whole = train(tmp_path / "whole", tokenizer, 4)
    whole.train()
    first = train(tmp_path / "first", tokenizer, 2)
    first.train()
    init = {name: str(tmp_path / "first" / name) for name in ("lora", "mix")}
    second = train(tmp_path / "second", tokenizer, 2, init)
    for name, folder in init.items():  # the saved adapters, exactly, before any step
        saved = load_file(f"{folder}/adapter_model.safetensors")
        assert all((second.jobs_model.job_state_dict(name)[k] == v).all() for k, v in saved.items())
    assert second.jobs_model.peft_config["mix"].num_experts == 4 and not second.jobs_model.peft_config["mix"].inference_mode
    second.train()
    assert [r["status"] for r in second.job_summary] == ["done", "done"]
    for name in init:
        a = load_file(tmp_path / "whole" / name / "adapter_model.safetensors")
        b = load_file(tmp_path / "second" / name / "adapter_model.safetensors")
        start = load_file(tmp_path / "first" / name / "adapter_model.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
        assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # the last two steps moved it


def test_bad_init_adapters_are_named(saved_lora, tmp_path):
    with pytest.raises(ValueError, match="job 'j': init_adapter must be an adapter folder or a hub id, got 'nowhere'"):
        JobConfig("j", None, rows(), init_adapter="nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="job 'j': init_adapter .* has no adapter_config.json"):
        JobConfig("j", LORA, rows(), init_adapter=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="holds a LoraConfig adapter, peft_config is a MixLoRAConfig"):
        JobConfig("j", mixlora(), rows(), init_adapter=saved_lora)
    with pytest.raises(TypeError, match="or None with an init_adapter"):
        JobConfig("j", None, rows())
    (tmp_path / "malformed").mkdir()
    (tmp_path / "malformed" / "adapter_config.json").write_text("{not json")
    (tmp_path / "malformed" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="malformed.*its adapter_config.json cannot be read as a PEFT config"):
        JobConfig("j", None, rows(), init_adapter=str(tmp_path / "malformed"))


def test_a_failed_set_up_gives_the_base_back_and_a_trained_one_is_refused_until_unloaded(saved_lora, tmp_path):
    tokenizer = synthetic.demo_tokenizer()
    base = tiny_base(vocab_size=len(tokenizer))
    narrow = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"has shape \(4, 64\), job 'j' needs \(2, 64\)"):
        MultiJobTrainer(model=base, processing_class=tokenizer,
                        jobs=[JobConfig("j", narrow, rows(), init_adapter=saved_lora)], args=run_args(tmp_path / "r"))
    trainer = MultiJobTrainer(model=base, processing_class=tokenizer, args=run_args(tmp_path / "r", max_steps=1),
                              jobs=[JobConfig("j", None, rows(), init_adapter=saved_lora)])  # the same base again
    trainer.train()
    with pytest.raises(ValueError, match=r"model already holds adapter layers \(adapters \['j'\]\).*jobs_model.unl"):
        MultiJobTrainer(model=base, processing_class=tokenizer, jobs=[JobConfig("k", LORA, rows())],
                        args=run_args(tmp_path / "r2"))
    trainer.jobs_model.unload()
    MultiJobTrainer(model=base, processing_class=tokenizer, jobs=[JobConfig("k", LORA, rows())],
                    args=run_args(tmp_path / "r2"))


def test_a_job_file_job_without_peft_takes_its_init_adapters_config(saved_lora, tmp_path):
    data = str(synthetic.write_jsonl(synthetic.multitask_rows(4, tasks=("add",)), tmp_path / "add.jsonl"))
    doc = {"model": "m", "output_dir": "out", "jobs": [
        {"name": "more", "type": "lora", "dataset": data, "init_adapter": saved_lora}]}
    (job,) = parse_run(yaml.safe_load(yaml.safe_dump(doc))).jobs
    assert isinstance(job.peft_config, LoraConfig) and job.peft_config.r == 4 and job.init_adapter == saved_lora
    doc["jobs"][0]["peft"] = {"lora_dropout": 0.1}  # fields changed on the saved config, the others kept
    (job,) = parse_run(doc).jobs
    assert (job.peft_config.r, job.peft_config.lora_alpha, job.peft_config.lora_dropout) == (4, 8, 0.1)
    doc["jobs"][0]["type"] = "mixlora"
    with pytest.raises(ValueError, match="job 'more': type is 'mixlora', its init_adapter holds a LoraConfig"):
        parse_run(doc)
    doc["jobs"][0].update(type="lora", init_adapter="out/other")
    doc["jobs"].append({"name": "other", "type": "lora", "dataset": data})
    with pytest.raises(ValueError, match="job 'more': init_adapter 'out/other' is the folder job 'other' of this"):
        parse_run(doc)


def test_a_hub_id_is_downloaded_as_peft_downloads_an_adapter(saved_lora, tmp_path, monkeypatch):
    """`init_adapter="owner/name"` (no such folder here): its adapter files by `huggingface_hub.snapshot_download`
    (one revision; a fake hub: a folder per repo), and the job starts from the snapshot; a repo that cannot be had is
    named; a path that looks local is never sent to the hub, and `~` is expanded."""
    import shutil

    import huggingface_hub

    hub = tmp_path / "hub"
    shutil.copytree(saved_lora, hub / "owner" / "lora")
    asked = []

    def download(repo_id, allow_patterns=None, **kwargs):
        asked.append((repo_id, sorted(allow_patterns)))
        if not (hub / repo_id).is_dir():
            raise OSError(f"404 {repo_id}")  # (as the hub's errors are)
        return str(hub / repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    job = JobConfig("j", None, rows(), init_adapter="owner/lora")
    assert asked == [("owner/lora", ["adapter_config.json", "adapter_model.safetensors"])]
    assert job.init_adapter == str(hub / "owner" / "lora") and job.peft_config.r == 4
    tokenizer = synthetic.demo_tokenizer()
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), processing_class=tokenizer, jobs=[job],
                              args=run_args(tmp_path / "r", max_steps=1))
    saved = load_file(f"{saved_lora}/adapter_model.safetensors")
    assert all(torch.equal(trainer.jobs_model.job_state_dict("j")[k], v) for k, v in saved.items())
    with pytest.raises(ValueError, match="init_adapter 'owner/missing' is no local folder, and as a hub id it cannot "
                                         r"be downloaded \(OSError: 404 owner/missing\)"):
        JobConfig("j", None, rows(), init_adapter="owner/missing")
    asked.clear()
    for local in ("./owner/lora", "owner/lora/sub", "~/owner/lora"):  # local paths: named as missing folders
        with pytest.raises(ValueError, match="must be an adapter folder or a hub id"):
            JobConfig("j", None, rows(), init_adapter=local)
    assert asked == []
    monkeypatch.setenv("HOME", str(hub))
    assert JobConfig("j", None, rows(), init_adapter="~/owner/lora").init_adapter == str(hub / "owner" / "lora")
    doc = {"model": "m", "output_dir": "out", "jobs": [
        {"name": "j", "type": "lora", "dataset": str(synthetic.write_jsonl(
            synthetic.multitask_rows(4, tasks=("add",)), tmp_path / "add.jsonl")), "init_adapter": "owner/lora"}]}
    (job,) = parse_run(doc).jobs  # in a job file: downloaded once
    assert job.init_adapter == str(hub / "owner" / "lora") and len(asked) == 1


def test_a_hub_repo_with_a_pickle_alone_is_named_with_how_to_convert_it(saved_lora, tmp_path, monkeypatch):
    """The snapshot (safetensors asked for) has the config alone: the Hub is asked what the repo holds, and a pickle
    alone is refused as `PeftModel.from_pretrained` refuses it, with `peft-mole convert-bin` (before: "has no
    adapter_model.safetensors", no word of the pickle)."""
    import shutil

    import huggingface_hub

    snapshot = tmp_path / "hub" / "owner" / "binonly"
    snapshot.mkdir(parents=True)
    shutil.copy(f"{saved_lora}/adapter_config.json", snapshot)
    files = {"adapter_config.json", "adapter_model.bin"}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(snapshot))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "file_exists", lambda repo_id, filename, **kwargs: filename in files)
    with pytest.raises(ValueError, match=r"job 'j': init_adapter: the Hub repo 'owner/binonly' holds only a pickle "
                                         r"adapter_model.bin.*`peft-mole convert-bin <folder>`"):
        JobConfig("j", None, rows(), init_adapter="owner/binonly")
    files.discard("adapter_model.bin")  # neither file: the snapshot is named as no adapter folder
    with pytest.raises(ValueError, match="binonly' has no adapter_model.safetensors"):
        JobConfig("j", None, rows(), init_adapter="owner/binonly")
    shutil.copytree(snapshot, snapshot / "math")  # in a subfolder: the Hub is asked for the subfolder's files
    files.update({"math/adapter_config.json", "math/adapter_model.bin"})
    with pytest.raises(ValueError, match=r"'owner/binonly' \(subfolder 'math'\) holds only a pickle"):
        JobConfig("j", None, rows(), init_adapter="owner/binonly", init_adapter_kwargs={"subfolder": "math"})


def test_init_adapter_kwargs_take_a_revision_and_subfolder_as_peft_model_from_pretrained(saved_lora, tmp_path,
                                                                                          monkeypatch):
    """`init_adapter_kwargs`: `PeftModel.from_pretrained`'s `revision`, `subfolder`, `token`, `cache_dir`. A hub
    repo's revision and subfolder go to the download (the subfolder's files alone), and the job starts from the
    subfolder's adapter; a local folder takes a subfolder, and the hub-only keys are refused for it; unknown keys,
    values of the wrong kind and a subfolder leaving the folder are refused naming the field; the kwargs are taken
    when the job is made (None after: `dataclasses.replace` gives the same job)."""
    import dataclasses
    import shutil

    import huggingface_hub

    hub = tmp_path / "hub"
    shutil.copytree(saved_lora, hub / "owner" / "many" / "v2" / "math")
    asked = []

    def download(repo_id, allow_patterns=None, revision=None, **kwargs):
        asked.append((repo_id, sorted(allow_patterns), revision, kwargs))
        return str(hub / repo_id / (revision or "main"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    job = JobConfig("j", None, rows(), init_adapter="owner/many",  # "math/": the folder "math"
                    init_adapter_kwargs={"revision": "v2", "subfolder": "math/", "token": "t"})
    assert asked == [("owner/many", ["math/adapter_config.json", "math/adapter_model.safetensors"], "v2",
                      {"token": "t"})]
    assert job.init_adapter == str(hub / "owner" / "many" / "v2" / "math") and job.init_adapter_kwargs is None
    assert dataclasses.replace(job).init_adapter == job.init_adapter and len(asked) == 1
    tokenizer = synthetic.demo_tokenizer()
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), processing_class=tokenizer, jobs=[job],
                              args=run_args(tmp_path / "r", max_steps=1))
    saved = load_file(f"{saved_lora}/adapter_model.safetensors")
    assert all(torch.equal(trainer.jobs_model.job_state_dict("j")[k], v) for k, v in saved.items())
    local = JobConfig("j", None, rows(), init_adapter=str(hub / "owner" / "many" / "v2"),
                      init_adapter_kwargs={"subfolder": "math"})
    assert local.init_adapter == job.init_adapter and local.peft_config.r == 4
    refused = [
        ({"revision": "v2"}, ValueError, r"init_adapter_kwargs \['revision'\] apply to a hub id; init_adapter "
                                         r"'.*' is a local path"),
        ({"branch": "v2"}, ValueError, r"unknown keys \['branch'\]; allowed: \['cache_dir', 'revision', "
                                       r"'subfolder', 'token'\]"),
        ({"revision": 2}, TypeError, r"init_adapter_kwargs\['revision'\] must be a non-empty string, got 2"),
        ({"subfolder": "../other"}, ValueError, "must be a relative path inside the adapter's folder or repo"),
        ({"subfolder": "./"}, ValueError, r"must be a relative path .* got '\./'"),
        ({"cache_dir": 3}, TypeError, r"init_adapter_kwargs\['cache_dir'\] must be a non-empty string or a path"),
        ("v2", TypeError, "init_adapter_kwargs must be a dict with keys from"),
    ]
    for kwargs, error, message in refused:
        with pytest.raises(error, match=message):
            JobConfig("j", None, rows(), init_adapter=saved_lora, init_adapter_kwargs=kwargs)
    with pytest.raises(ValueError, match="job 'j': init_adapter_kwargs needs an init_adapter"):
        JobConfig("j", LORA, rows(), init_adapter_kwargs={"subfolder": "math"})
    doc = {"model": "m", "output_dir": "out", "jobs": [
        {"name": "j", "type": "lora", "dataset": str(synthetic.write_jsonl(
            synthetic.multitask_rows(4, tasks=("add",)), tmp_path / "add.jsonl")), "init_adapter": "owner/many",
         "init_adapter_kwargs": {"revision": "v2", "subfolder": "math"}}]}
    (job,) = parse_run(doc).jobs  # in a job file: the same download, once
    assert job.init_adapter == str(hub / "owner" / "many" / "v2" / "math") and len(asked) == 2
    doc["jobs"][0]["init_adapter_kwargs"] = {"revision": ["v2"]}
    with pytest.raises(ValueError, match=r"init_adapter_kwargs\['revision'\] must be a non-empty string"):
        parse_run(doc)
