"""`peft-mole train jobs.yaml`: the YAML job file builds the same JobConfigs as Python, and bad files get clear
errors naming the key, the job and what is allowed."""

from __future__ import annotations

import os

import pytest
import yaml
from peft import LoraConfig

from peft_mole import DynMoLEConfig, MixLoRAConfig, synthetic
from peft_mole.multijob.job_file import _yaml_loader, load_run, parse_run


@pytest.fixture
def data_file(tmp_path):
    return str(synthetic.write_jsonl(synthetic.multitask_rows(8, tasks=("add",)), tmp_path / "add.jsonl"))


def run_dict(data_file, **extra):
    doc = {
        "model": "some/model", "output_dir": "out", "args": {"max_length": 32, "learning_rate": 1e-3},
        "max_memory_gb": 2, "jobs": [
            {"name": "a", "type": "lora", "peft": {"r": 4, "target_modules": ["q_proj"]}, "dataset": data_file,
             "learning_rate": 2e-4, "priority": 2},
            {"name": "b", "type": "mixlora", "peft": {"num_experts": 4, "top_k": 1}, "dataset": data_file},
            {"name": "c", "type": "dynmole", "dataset": data_file, "max_steps": 5},
        ],
    }
    doc.update(extra)
    return doc


def test_job_file_builds_job_configs(data_file, tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(run_dict(data_file)))
    spec = load_run(str(path))
    assert [type(j.peft_config) for j in spec.jobs] == [LoraConfig, MixLoRAConfig, DynMoLEConfig]
    a, b, c = spec.jobs
    assert (a.learning_rate, a.priority, a.peft_config.r) == (2e-4, 2, 4)
    assert b.peft_config.top_k == 1 and c.max_steps == 5 and len(a.train_dataset) == 8
    assert spec.max_memory == 2 * 2**30 and spec.tokenizer == "some/model" and spec.args["max_length"] == 32


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.update(epochs=3), r"job file: unknown key\(s\) \['epochs'\]"),
        (lambda d: d.pop("jobs"), "missing required key 'jobs'"),
        (lambda d: d["jobs"][1].update(name="a"), r"used more than once: \['a'\]"),
        (lambda d: d["jobs"][0].update(type="ia3"), r"unknown type 'ia3'; allowed: \['dynmole', 'lora', 'mixlora'\]"),
        (lambda d: d["jobs"][0].update(lr=1), r"job 'a': unknown key\(s\) \['lr'\]"),
        (lambda d: d["jobs"][1]["peft"].update(experts=3), r"job 'b' peft: unknown key\(s\) \['experts'\]"),
        (lambda d: d["jobs"][2].update(dataset="missing.jsonl"), "dataset file 'missing.jsonl' does not exist"),
        (lambda d: d["jobs"][2].update(dataset="no-such-org/no-such-set"), "job 'c': cannot load dataset"),
        (lambda d: d["jobs"][2].pop("dataset"), "job 'c': missing required key 'dataset'"),
        (lambda d: d["args"].update(learning_rat=1), r"args: unknown key\(s\) \['learning_rat'\]"),
        (lambda d: d["jobs"][1]["peft"].update(top_k=9), "top_k"),
        (lambda d: d["jobs"][0].update(name="a/b"), "job name 'a/b' is not allowed"),
        (lambda d: d.update(jobs=[]), "jobs must be a non-empty list"),
        # values of the wrong type: ValueErrors naming the job and field (TypeError tracebacks before 2026-12-05)
        (lambda d: d["jobs"][0].update(priority="high"), "job 'a': priority must be an int"),
        (lambda d: d["jobs"][1]["peft"].update(num_experts="four"), "job 'b' peft: num_experts must be an int"),
        (lambda d: d["jobs"][2].update(max_steps="four"), "job 'c': max_steps must be an int >= 1"),
        (lambda d: d.update(max_concurrent_jobs="three"), "max_concurrent_jobs must be an int >= 1"),
        (lambda d: d.update(max_memory_gb=0), "max_memory_gb must be a finite number > 0"),
        # found by a review (2026-12-08, twenty-ninth session): NaN and infinity were refused only after the data and
        # model were loaded, in bytes; a list as type was a TypeError; "A" and "a" are one folder on macOS/Windows;
        # resume_from_checkpoint was taken and ignored (the run started afresh under a new run id)
        (lambda d: d.update(max_memory_gb=float("nan")), "max_memory_gb must be a finite number > 0 .*got nan"),
        (lambda d: d.update(max_memory_gb=float("inf")), "max_memory_gb must be a finite number > 0 .*got inf"),
        (lambda d: d["jobs"][0].update(type=["lora"]), r"job 'a': unknown type \['lora'\]; allowed:"),
        (lambda d: d["jobs"][1].update(name="A"), r"unique, whatever their case .*used more than once: \['A', 'a'\]"),
        (lambda d: d["args"].update(resume_from_checkpoint="out/a/checkpoint-2"),
         "resume_from_checkpoint is not read from a job file; run `peft-mole train FILE --resume`"),
        # found by a probe (2026-12-05, eighth session): errors deep in PEFT, torch or TRL before, or later in train()
        (lambda d: d["jobs"][0]["peft"].update(r="4"), "job 'a' peft: r must be an int, got '4'"),
        (lambda d: d["jobs"][0]["peft"].update(lora_dropout="0.1"), "job 'a' peft: lora_dropout must be a number"),
        (lambda d: d["jobs"][0]["peft"].update(r=True), "job 'a' peft: r must be an int, got True"),
        (lambda d: d["args"].update(max_steps="ten"), "job file args: max_steps must be an int, got 'ten'"),
        (lambda d: d["args"].update(max_length="64"), "job file args: max_length must be an int or null, got '64'"),
        (lambda d: d["args"].update(router_aux_loss_coef="abc"), "router_aux_loss_coef must be a number or null"),
        (lambda d: d.update(step_overhead_tokens="fast"), "step_overhead_tokens must be 'auto', an int >= 0 or null"),
        (lambda d: d["jobs"][0].update(lr_scheduler_type="linaer"), "job 'a': lr_scheduler_type must be one of"),
        (lambda d: d["jobs"][0].update(lr_scheduler_kwargs="min_lr=1e-6"), "job 'a': lr_scheduler_kwargs must be a"),
        (lambda d: d["jobs"][2].update(dataset_split="validation"), "job 'c': dataset file .* split 'validation'"),
        (lambda d: d["jobs"][2].update(eval_dataset_split="train"), "job 'c': eval_dataset_split needs an eval_"),
        # found by a probe (2026-12-06, fourteenth session): taken as str(value) before (`output_dir: null` trained
        # into ./None), or an error naming neither job nor field ("'int' object is not iterable")
        (lambda d: d.update(output_dir=None), "job file: output_dir must be a non-empty string .*got None"),
        (lambda d: d.update(model=["a", "b"]), "job file: model must be a non-empty string"),
        (lambda d: d.update(tokenizer=3), "job file: tokenizer must be a non-empty string .*got 3"),
        (lambda d: d["jobs"][0]["peft"].update(target_modules=5),
         "job 'a' peft: target_modules must be a list of strings or a string or null, got 5"),
        (lambda d: d["jobs"][0]["peft"].update(target_modules=["q_proj", 1]), "job 'a' peft: target_modules must"),
        (lambda d: d["jobs"][1]["peft"].update(expert_target_modules=7),
         "job 'b' peft: expert_target_modules must be a list of strings"),
        # found by a probe (2026-12-06, seventeenth session): an int field of the trainer's args took a float
        # (`max_steps: 2.5` trained 3 steps, `max_length: 32.5` failed inside TRL naming neither), a negative
        # max_steps trained by epochs, and two odd names or keys raised TypeError tracebacks
        (lambda d: d["args"].update(max_steps=2.5), "job file args: max_steps must be an int, got 2.5"),
        (lambda d: d["args"].update(max_length=32.5), "job file args: max_length must be an int or null, got 32.5"),
        (lambda d: d["args"].update(seed=1.5), "job file args: seed must be an int, got 1.5"),
        (lambda d: d["args"].update(max_steps=-5), r"job file args: max_steps must be an int >= 1 \(or -1 for epo"),
        (lambda d: d["args"].update(max_steps=0), "job file args: max_steps must be an int >= 1"),
        (lambda d: [j.update(name=["x"]) for j in d["jobs"][:2]], r"job name \['x'\] is not allowed"),
        (lambda d: d["jobs"][0].update({1: 2, "foo": 3}), r"job 'a': unknown key\(s\) \['foo', 1\]"),
        (lambda d: d["jobs"][2].update(dataset_config="main"), "job 'c': dataset_config names a configuration of a"),
        (lambda d: d.update(model="./no-such-model"), "job file: model './no-such-model' is a local path, and no such"),
        (lambda d: d.update(tokenizer="/no/such/tok"), "job file: tokenizer '/no/such/tok' is a local path, and no"),
    ],
)
def test_bad_job_files_say_what_is_wrong(data_file, change, match):
    doc = run_dict(data_file)
    change(doc)
    with pytest.raises(ValueError, match=match):
        parse_run(doc)


def test_unreadable_job_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_run(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs: [\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_run(str(bad))
    bad.write_text("- just a list\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_run(str(bad))


def test_a_key_given_twice_is_refused_with_its_line(data_file, tmp_path):
    """PyYAML keeps the last of two equal keys: a job's second `learning_rate` won silently, and a second `jobs:`
    dropped the first list of jobs. A merge (`<<: *defaults`) may still be overridden."""
    text = yaml.safe_dump(run_dict(data_file), sort_keys=False)
    path = tmp_path / "jobs.yaml"
    path.write_text(text.replace("  learning_rate: 0.0002\n", "  learning_rate: 0.0002\n  learning_rate: 5.0\n"))
    with pytest.raises(ValueError, match=r"(?s)the key .learning_rate. is given twice.*line 1[0-9]"):
        load_run(str(path))
    path.write_text(text + "jobs: []\n")
    with pytest.raises(ValueError, match="the key 'jobs' is given twice"):
        load_run(str(path))
    path.write_text("? [a, b]\n: 1\n" + text)   # a key YAML allows and Python cannot hash: a ValueError too
    with pytest.raises(ValueError, match="found unhashable key"):
        load_run(str(path))
    path.write_text(f"defaults: &d {{learning_rate: 0.1, priority: 3, max_steps: 9}}\n{text}".replace(
        "  learning_rate: 0.0002\n", "  <<: *d\n  learning_rate: 0.0002\n").replace("defaults:", "x-defaults:"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['x-defaults'\]"):   # parsed: the merge was taken
        load_run(str(path))
    job = yaml.load(path.read_text(), Loader=_yaml_loader())["jobs"][0]  # noqa: S506 (a SafeLoader)
    assert (job["learning_rate"], job["priority"], job["max_steps"]) == (0.0002, 2, 9)  # given keys win


@pytest.mark.parametrize(("content", "match"), [
    ("", r"dataset file '.*bad.jsonl' is empty"),
    ('{"prompt": "1+1=", "completion": "2"}\n{"prompt": oops}\n',
     r"dataset file '.*bad.jsonl', split None, cannot be read"),
])
def test_an_unreadable_dataset_file_is_named_with_its_job(data_file, tmp_path, content, match):
    """Before: a bare StopIteration (an empty file) or DatasetGenerationError from datasets, naming neither."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    doc = run_dict(data_file)
    doc["jobs"][1]["dataset"] = str(bad)
    with pytest.raises(ValueError, match="job 'b': " + match):
        parse_run(doc)


def test_numbers_without_a_dot_read_as_numbers(data_file, tmp_path):
    """YAML 1.1 (PyYAML) reads 3e-3 as a string, which SFTConfig accepts and the optimizer then fails on; the job
    file reads it as TRL's CLI does, a float."""
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(run_dict(data_file)).replace("learning_rate: 0.001", "learning_rate: 3e-3")
                    .replace("learning_rate: 0.0002", "learning_rate: 5E-4"))
    spec = load_run(str(path))
    assert spec.args["learning_rate"] == 3e-3 and spec.jobs[0].learning_rate == 5e-4
    # a dot with an unsigned exponent, and no digit before the dot (strings in YAML 1.1, refused as such before)
    path.write_text(yaml.safe_dump(run_dict(data_file)).replace("learning_rate: 0.001", "learning_rate: 1.5e-3")
                    .replace("learning_rate: 0.0002", "learning_rate: .5e-3")
                    .replace("max_length: 32", "max_length: 3.2e1"))
    spec = load_run(str(path))
    assert (spec.args["learning_rate"], spec.jobs[0].learning_rate, spec.args["max_length"]) == (1.5e-3, 5e-4, 32)


def test_splits_of_local_files_and_step_overhead_tokens_reach_the_run(data_file):
    """`dataset_split` slices a local file too (before: ignored, every row trained); a local eval file is its
    "train" split unless `eval_dataset_split` says otherwise; `step_overhead_tokens` reaches the trainer."""
    doc = run_dict(data_file, step_overhead_tokens=0)
    doc["jobs"][0].update(dataset_split="train[:4]", eval_dataset=data_file)
    doc["jobs"][1].update(eval_dataset=data_file, eval_dataset_split="train[-3:]")
    spec = parse_run(doc)
    a, b, c = spec.jobs
    assert (len(a.train_dataset), len(a.eval_dataset), len(b.eval_dataset), len(c.train_dataset)) == (4, 8, 3, 8)
    assert a.train_dataset[0] == c.train_dataset[0] and b.eval_dataset[0] == c.train_dataset[5]
    assert spec.step_overhead_tokens == 0 and parse_run(run_dict(data_file)).step_overhead_tokens == "auto"
    doc = run_dict(data_file)  # a float where a config annotates int but takes floats (PEFT's lora_alpha)
    doc["jobs"][0]["peft"]["lora_alpha"] = 16.5
    doc["jobs"][1]["peft"]["lora_alpha"] = 8.0
    assert [job.peft_config.lora_alpha for job in parse_run(doc).jobs[:2]] == [16.5, 8.0]


def test_trainer_args_take_whole_floats_for_int_fields_and_ints_for_number_fields(data_file):
    """YAML 1.2 reads `1e3` as a float: a whole one is the int for an int field (SFTConfig's would fail on 1000.0)."""
    doc = run_dict(data_file)
    doc["args"].update(save_steps=0.5, num_train_epochs=2, max_steps=1e3, max_length=64.0, seed=-1.0)
    args = parse_run(doc).args
    assert [(args[k], type(args[k])) for k in ("save_steps", "num_train_epochs", "max_steps", "max_length", "seed")] \
        == [(0.5, float), (2, int), (1000, int), (64, int), (-1, int)]
    doc["args"].update(max_steps=-1, max_length=None)
    assert (parse_run(doc).args["max_steps"], parse_run(doc).args["max_length"]) == (-1, None)


def test_job_fields_take_whole_floats_for_int_fields_as_the_trainer_args_do(data_file):
    """`max_steps: 1e3` in a job is 1000, as under `args:` (before 2026-12-06, eighteenth session, a job refused
    it: "max_steps must be an int >= 1 ... got 1000.0"); a fractional value is still refused."""
    doc = run_dict(data_file)
    doc["jobs"][2].update(max_steps=1e3, per_device_train_batch_size=8.0, seed=3.0, learning_rate=1e-3)
    job = parse_run(doc).jobs[2]
    assert [(v, type(v)) for v in (job.max_steps, job.per_device_train_batch_size, job.seed, job.learning_rate)] \
        == [(1000, int), (8, int), (3, int), (1e-3, float)]
    doc["jobs"][2].update(max_steps=2.5)
    with pytest.raises(ValueError, match="job 'c': max_steps must be an int >= 1 .*got 2.5"):
        parse_run(doc)


def test_a_home_folder_is_read_as_the_shell_reads_it(data_file, tmp_path, monkeypatch):
    """`model: ~/base` names the folder under $HOME (before 2026-12-08: refused as "no such folder exists" while
    init_adapter and output_dir took `~`), and an init_adapter given as `~/...` is still the folder a job of this file
    trains into."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "base").mkdir()
    doc = run_dict(data_file, model="~/base", tokenizer="~/base", output_dir="~/runs")
    doc["jobs"][0]["dataset"] = "~/" + os.path.relpath(data_file, tmp_path)  # (the data file lies under tmp_path)
    spec = parse_run(doc)
    assert (spec.model, spec.tokenizer, spec.output_dir) == (str(tmp_path / "base"),) * 2 + (str(tmp_path / "runs"),)
    assert len(spec.jobs[0].train_dataset) == 8
    doc = run_dict(data_file, model="~/base", output_dir=str(tmp_path / "runs"))
    doc["jobs"][1]["init_adapter"] = "~/runs/a"
    with pytest.raises(ValueError, match="job 'b': init_adapter '~/runs/a' is the folder job 'a' of this file"):
        parse_run(doc)
