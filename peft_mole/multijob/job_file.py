"""A multi-job run described in YAML, for `peft-mole train jobs.yaml` (same semantics as the Python API).

    model: Qwen/Qwen2.5-0.5B          # hub id or local path (AutoModelForCausalLM.from_pretrained)
    tokenizer: Qwen/Qwen2.5-0.5B      # optional, default: model
    output_dir: runs/demo
    max_concurrent_jobs: 4            # optional
    max_memory_gb: 60                 # optional: the scheduler's step-memory budget
    args: {max_length: 512, learning_rate: 2.0e-4, max_steps: 300}   # SFTConfig fields shared by all jobs
    jobs:
      - name: math
        type: lora                    # lora | mixlora | dynmole
        peft: {r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}
        dataset: data/math.jsonl      # local .json/.jsonl/.csv/.parquet file, or a hub dataset name
        learning_rate: 1.0e-4         # any JobConfig field
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import Any

from peft import LoraConfig

from peft_mole.multijob.jobs import JobConfig
from peft_mole.tuners.dynmole.config import DynMoLEConfig
from peft_mole.tuners.mixlora.config import MixLoRAConfig

PEFT_TYPES = {"lora": LoraConfig, "mixlora": MixLoRAConfig, "dynmole": DynMoLEConfig}
RUN_KEYS = {"model", "tokenizer", "output_dir", "max_concurrent_jobs", "max_memory_gb", "args", "jobs"}
JOB_KEYS = {"name", "type", "peft", "dataset", "dataset_config", "dataset_split", "eval_dataset"} | {
    f.name for f in fields(JobConfig) if f.name not in ("name", "peft_config", "train_dataset", "eval_dataset")
}
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class RunSpec:
    model: str
    tokenizer: str
    output_dir: str
    args: dict
    jobs: list[JobConfig]
    max_concurrent_jobs: int | None = None
    max_memory: float | None = None


def _unknown(where: str, given: dict, allowed: set[str]) -> None:
    extra = sorted(set(given) - allowed)
    if extra:
        raise ValueError(f"{where}: unknown key(s) {extra}; allowed: {sorted(allowed)}")


def load_dataset_spec(spec: str, job: str, config: str | None = None, split: str = "train"):
    """A local data file (by extension) or a hub dataset, via `datasets.load_dataset`, with a clear error."""
    from datasets import load_dataset

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"job {job!r}: dataset must be a file path or a hub dataset name, got {spec!r}")
    ext = os.path.splitext(spec)[1].lower()
    if ext in _LOCAL_FORMATS:
        if not os.path.isfile(spec):
            raise ValueError(f"job {job!r}: dataset file {spec!r} does not exist")
        return load_dataset(_LOCAL_FORMATS[ext], data_files=spec, split="train")
    try:
        return load_dataset(spec, config, split=split)
    except Exception as error:  # noqa: BLE001 — re-raised with the job and what was tried
        raise ValueError(
            f"job {job!r}: cannot load dataset {spec!r} (not a local .json/.jsonl/.csv/.parquet file, and the hub "
            f"said: {type(error).__name__}: {error})"
        ) from error


def _job(entry: Any, index: int) -> JobConfig:
    if not isinstance(entry, dict):
        raise ValueError(f"jobs[{index}] must be a mapping, got {entry!r}")
    name = entry.get("name", f"jobs[{index}]")
    _unknown(f"job {name!r}", entry, JOB_KEYS)
    for key in ("name", "type", "dataset"):
        if key not in entry:
            raise ValueError(f"job {name!r}: missing required key {key!r}")
    kind = entry["type"]
    if kind not in PEFT_TYPES:
        raise ValueError(f"job {name!r}: unknown type {kind!r}; allowed: {sorted(PEFT_TYPES)}")
    peft_kwargs = entry.get("peft") or {}
    if not isinstance(peft_kwargs, dict):
        raise ValueError(f"job {name!r}: peft must be a mapping of {PEFT_TYPES[kind].__name__} fields")
    known = {f.name for f in fields(PEFT_TYPES[kind])}
    _unknown(f"job {name!r} peft", peft_kwargs, known)
    try:
        peft_config = PEFT_TYPES[kind](**peft_kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"job {name!r} peft: {error}") from error
    split = entry.get("dataset_split", "train")
    train = load_dataset_spec(entry["dataset"], name, entry.get("dataset_config"), split)
    evaluation = None
    if entry.get("eval_dataset"):
        evaluation = load_dataset_spec(entry["eval_dataset"], name, entry.get("dataset_config"), "validation")
    overrides = {k: v for k, v in entry.items() if k not in {"name", "type", "peft", "dataset", "dataset_config",
                                                             "dataset_split", "eval_dataset"}}
    try:
        return JobConfig(name=name, peft_config=peft_config, train_dataset=train, eval_dataset=evaluation, **overrides)
    except TypeError as error:  # a value of the wrong type (JobConfig names the job and the field)
        raise ValueError(str(error)) from error


def parse_run(data: Any) -> RunSpec:
    """Validate a parsed YAML document and build its JobConfigs (datasets are loaded here; paths are relative to
    the working directory, as in TRL's CLI)."""
    if not isinstance(data, dict):
        raise ValueError("the job file must be a YAML mapping with keys model, output_dir and jobs")
    _unknown("job file", data, RUN_KEYS)
    for key in ("model", "output_dir", "jobs"):
        if key not in data:
            raise ValueError(f"job file: missing required key {key!r}")
    jobs = data["jobs"]
    if not isinstance(jobs, list) or not jobs:
        raise ValueError("job file: jobs must be a non-empty list")
    names = [j.get("name") for j in jobs if isinstance(j, dict)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"job file: job names must be unique; used more than once: {duplicates}")
    args = data.get("args") or {}
    if not isinstance(args, dict):
        raise ValueError("job file: args must be a mapping of SFTConfig fields")
    from trl import SFTConfig

    _unknown("job file args", args, {f.name for f in fields(SFTConfig)} - {"output_dir"})
    built = [_job(entry, i) for i, entry in enumerate(jobs)]
    memory, concurrent = data.get("max_memory_gb"), data.get("max_concurrent_jobs")
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0):
        raise ValueError(f"job file: max_memory_gb must be a number > 0, got {memory!r}")
    if concurrent is not None and (isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1):
        raise ValueError(f"job file: max_concurrent_jobs must be an int >= 1, got {concurrent!r}")
    return RunSpec(
        model=str(data["model"]), tokenizer=str(data.get("tokenizer") or data["model"]),
        output_dir=str(data["output_dir"]), args=args, jobs=built,
        max_concurrent_jobs=concurrent,
        max_memory=None if memory is None else float(memory) * 2**30,
    )


def _yaml_loader():
    """PyYAML's SafeLoader that also reads 3e-3 and 1e5 as numbers (YAML 1.2, as TRL's CLI takes them; YAML 1.1
    needs a dot, so PyYAML reads them as strings, which SFTConfig accepts and the optimizer then fails on)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def load_run(path: str) -> RunSpec:
    import yaml

    _Loader = _yaml_loader()

    if not os.path.isfile(path):
        raise ValueError(f"job file {path!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=_Loader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as error:
            raise ValueError(f"job file {path!r} is not valid YAML: {error}") from error
    return parse_run(data)
