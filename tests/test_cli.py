"""`peft-mole` command line: user errors end in one line naming what is wrong (no traceback), before any work is
done where that can be known first; `train` is reproducible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peft_mole import MultiJobTrainer, synthetic
from peft_mole.cli import main
from tests.helpers import tiny_base


def test_convert_bin_does_not_replace_existing_safetensors_unless_asked(tmp_path):
    """A folder with trained safetensors and an older pickle: before, convert-bin silently replaced the former."""
    save_file({"w": torch.ones(2)}, tmp_path / "adapter_model.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "adapter_model.bin")
    with pytest.raises(SystemExit, match="exists already"):
        main(["convert-bin", str(tmp_path)])
    assert torch.equal(load_file(tmp_path / "adapter_model.safetensors")["w"], torch.ones(2))
    assert main(["convert-bin", str(tmp_path), "--overwrite"]) == 0
    assert torch.equal(load_file(tmp_path / "adapter_model.safetensors")["w"], torch.zeros(2))
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(SystemExit, match="cannot be read as tensors"):
        main(["convert-bin", str(tmp_path), "--overwrite"])
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--limit", "0"], "--limit must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--tasks", ","], "--tasks needs at least one task"),
        (["--out", "FILE"], "exists and is not a folder"),
        (["--out", "FILE/sub/dir"], "FILE exists and is not a folder"),  # (before: after the whole evaluation)
        (["--adapters", "NO_WEIGHTS"], "holds adapter_config.json but no adapter_model.safetensors"),
        ([], r"peft-mole eval: \w+Error"),  # the base path does not exist: one line, not a traceback
    ],
)
def test_eval_refuses_bad_arguments_before_loading_anything(tmp_path, extra, match):
    (tmp_path / "FILE").write_text("")
    (tmp_path / "NO_WEIGHTS").mkdir()
    (tmp_path / "NO_WEIGHTS" / "adapter_config.json").write_text('{"peft_type": "PEFT_MOLE_MIXLORA"}')
    extra = [str(tmp_path / a) if a.startswith(("FILE", "NO_WEIGHTS")) else a for a in extra]
    args = ["eval", "--base", str(tmp_path / "no-base"), "--adapters", str(tmp_path / "a"), "--tasks", "boolq"]
    with pytest.raises(SystemExit, match=match):
        main(args + extra)


def test_eval_adapter_names_are_module_names():
    from peft_mole.cli import adapter_name

    paths = ["runs/qwen2.5-mix", "me/mix.v1", "x/__base__", "/", "ok_1", "runs/train", "out/keys"]
    assert [adapter_name(p, i) for i, p in enumerate(paths)] \
        == ["qwen2_5-mix", "mix_v1", "adapter2", "adapter3", "ok_1", "adapter5", "adapter6"]  # (a KeyError before)


def test_eval_of_an_adapter_of_another_base_is_one_line(tmp_path):
    """A LoRA adapter trained on a base of other sizes: before 2026-12-08, torch's RuntimeError from load_state_dict
    (ours name the sizes themselves, as a ValueError)."""
    from peft import LoraConfig, get_peft_model

    tokenizer = synthetic.demo_tokenizer(save_dir=tmp_path / "tokenizer")
    tiny_base(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    wider = tiny_base(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=128)
    get_peft_model(wider, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "mix")
    synthetic.write_jsonl([{"question": "q?", "passage": "p", "answer": True}], tmp_path / "data" / "boolq.jsonl")
    with pytest.raises(SystemExit, match=r"(?s)peft-mole eval: an adapter of .*mix'\] does not fit --base .*"
                                         "size mismatch"):
        main(["eval", "--base", str(tmp_path / "base"), "--tokenizer", str(tmp_path / "tokenizer"),
              "--adapters", str(tmp_path / "mix"), "--tasks", "boolq", "--data-dir", str(tmp_path / "data"),
              "--out", str(tmp_path / "out")])


def test_eval_of_a_moe_peft_adapter_says_to_convert_it(tmp_path):
    """Before: `KeyError: 'MIXLORA'` from PEFT's config registry."""
    fixture = Path(__file__).parent / "fixtures" / "moe_peft_mixlora"
    args = ["eval", "--base", str(fixture / "base"), "--tokenizer", str(tmp_path / "no-tokenizer"),
            "--adapters", str(fixture / "adapter"), "--tasks", "boolq"]
    synthetic.demo_tokenizer(save_dir=tmp_path / "no-tokenizer")
    with pytest.raises(SystemExit, match="convert it first: peft-mole convert --from moe-peft"):
        main(args)


def test_eval_of_a_moe_peft_adapter_by_hub_id_says_to_convert_it(tmp_path, monkeypatch):
    """The same adapter as a Hub id (from the cache, offline): before, a bare `KeyError: 'MIXLORA'`."""
    from huggingface_hub import constants

    from tests.test_hub import cache_snapshot

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fixture = Path(__file__).parent / "fixtures" / "moe_peft_mixlora"
    cache_snapshot(tmp_path / "cache", "owner/moe-peft-mixlora", fixture / "adapter")
    synthetic.demo_tokenizer(save_dir=tmp_path / "tokenizer")
    with pytest.raises(SystemExit, match="owner/moe-peft-mixlora is a MoE-PEFT adapter; convert it first"):
        main(["eval", "--base", str(fixture / "base"), "--tokenizer", str(tmp_path / "tokenizer"),
              "--adapters", "owner/moe-peft-mixlora", "--tasks", "boolq"])


@pytest.fixture
def job_file(tmp_path):
    """A one-job YAML run on a tiny local base, tokenizer and data set; `write(**args)` writes it."""
    tokenizer = synthetic.demo_tokenizer(save_dir=tmp_path / "tokenizer")
    tiny_base(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    data = synthetic.write_jsonl(synthetic.multitask_rows(16, tasks=("add",)), tmp_path / "add.jsonl")

    def write(name: str, model=None, **args) -> str:
        doc = {"model": str(model or tmp_path / "base"), "tokenizer": str(tmp_path / "tokenizer"),
               "output_dir": str(tmp_path / name),
               "args": {"max_length": 32, "max_steps": 2, "per_device_train_batch_size": 4, "report_to": [],
                        "use_cpu": True, "bf16": False, "save_strategy": "no", "disable_tqdm": True, **args},
               "jobs": [{"name": "add", "type": "lora", "dataset": str(data),
                         "peft": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}]}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return str(path)

    return write


def test_train_twice_gives_the_same_adapter(job_file, tmp_path):
    """The adapters are initialised after seeding with `args.seed` (before: from whatever state torch's generator
    was in, so two runs of one job file differed by up to 0.25)."""
    assert main(["train", job_file("one")]) == 0
    torch.rand(7)  # another generator state between the runs
    assert main(["train", job_file("two")]) == 0
    one = load_file(tmp_path / "one" / "add" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "add" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(learning_rate="abc"), "job file args: learning_rate must be a number, got 'abc'"),
        (dict(learning_rate=-1.0), "trainer arguments: learning_rate must be a finite number > 0, got -1.0"),
        (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef must be None or a finite number >= 0, got -1.0"),
        # set-up that train() checks as it begins (a traceback before 2026-12-05, eighth session)
        (dict(dataloader_drop_last=True, per_device_train_batch_size=64), "job 'add': its 16 rows make no batch"),
        (dict(per_device_train_batch_size=0), "per_device_train_batch_size must be an int >= 1"),
        # a missing local folder is named as one (before 2026-12-06, seventeenth session: transformers' "Repo id
        # must be in the form 'repo_name'" after "cannot be loaded")
        (dict(model="MISSING"), "model '.*MISSING' is a local path, and no such folder exists"),
        # the key named (before 2026-12-06, eighteenth session: "[Errno 17] File exists" alone)
        (dict(output_dir_is_a_file=True), "peft-mole train: output_dir '.*run' cannot be made: .*File exists"),
        (dict(resume_from_checkpoint=True), "resume_from_checkpoint is not read from a job file"),
    ],
)
def test_train_errors_are_one_line(job_file, tmp_path, change, match):
    model = tmp_path / "MISSING" if change.pop("model", None) else None
    if change.pop("output_dir_is_a_file", False):
        (tmp_path / "run").write_text("")
    with pytest.raises(SystemExit, match=match):
        main(["train", job_file("run", model=model, **change)])


def test_train_does_not_replace_an_earlier_runs_adapters_unless_asked(job_file, tmp_path):
    """A second fresh run into one output_dir replaced each job's trained adapter at its end, without a word (before
    2026-12-08); now it stops before loading anything, and --overwrite or --resume say what to do."""
    path = job_file("run")
    assert main(["train", path]) == 0
    adapter = tmp_path / "run" / "add" / "adapter_model.safetensors"
    first = adapter.read_bytes()
    with pytest.raises(SystemExit, match=r"holds the trained adapters of an earlier run for jobs \['add'\]; pass "
                                         "--resume .* --overwrite"):
        main(["train", job_file("run", learning_rate=1e-2)])
    assert adapter.read_bytes() == first
    assert main(["train", path, "--resume"]) == 0 and adapter.read_bytes() == first  # (an ended job stays ended)
    assert main(["train", job_file("run", learning_rate=1e-2), "--overwrite"]) == 0
    assert adapter.read_bytes() != first


def test_train_loads_the_tokenizer_as_sft_trainer_loads_the_processor(job_file, tmp_path, monkeypatch):
    """With the model's revision and the args' trust_remote_code (before 2026-12-08 the tokenizer was loaded with
    neither: a custom-code tokenizer failed, a revision's model came with the default branch's tokenizer)."""
    from transformers import AutoTokenizer

    seen, load = [], AutoTokenizer.from_pretrained

    def recording(name, **kwargs):
        seen.append(kwargs)
        return load(name, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", recording)
    path = Path(job_file("run", trust_remote_code=True, model_init_kwargs={"revision": "main"}))
    assert main(["train", str(path)]) == 0  # a tokenizer of its own: the model's revision is not its
    load(str(tmp_path / "tokenizer")).save_pretrained(tmp_path / "base")  # the model's own tokenizer
    doc = yaml.safe_load(path.read_text())
    doc.pop("tokenizer")
    doc["output_dir"] = str(tmp_path / "again")
    path.write_text(yaml.safe_dump(doc))
    assert main(["train", str(path)]) == 0
    assert seen == [{"trust_remote_code": True, "revision": None}, {"trust_remote_code": True, "revision": "main"}]
    with pytest.raises(SystemExit, match="2"):  # argparse: not both
        main(["train", str(path), "--resume", "--overwrite"])


def test_train_loads_the_base_as_sft_trainer_does_with_the_files_model_init_kwargs(job_file, tmp_path, monkeypatch):
    """float32 unless `args.model_init_kwargs` set a dtype, as SFTTrainer loads a model path (before: the
    checkpoint's dtype, bfloat16 here, and the file's `model_init_kwargs` ignored)."""
    job_file("first")  # writes the base
    AutoModelForCausalLM.from_pretrained(tmp_path / "base").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    seen, init = [], MultiJobTrainer.__init__

    def recording(self, model, *args, **kwargs):
        seen.append(model.dtype)
        init(self, model, *args, **kwargs)

    monkeypatch.setattr(MultiJobTrainer, "__init__", recording)
    assert main(["train", job_file("f32", model=tmp_path / "bf16")]) == 0
    assert main(["train", job_file("b16", model=tmp_path / "bf16", model_init_kwargs={"dtype": "bfloat16"})]) == 0
    assert seen == [torch.float32, torch.bfloat16]


def test_train_resume_of_a_changed_job_is_one_line(job_file, tmp_path):
    """A job whose rank changed since its checkpoints were written: before, a traceback from the adapter load."""
    path = Path(job_file("run", save_strategy="steps", save_steps=1))
    assert main(["train", str(path), "--resume"]) == 0
    doc = yaml.safe_load(path.read_text())
    doc["jobs"][0]["peft"]["r"] = 8
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SystemExit, match=r"peft-mole train: job 'add' cannot resume as it is set up now .*"
                                         r"has shape \(4, 64\), job 'add' needs \(8, 64\)"):
        main(["train", str(path), "--resume"])
