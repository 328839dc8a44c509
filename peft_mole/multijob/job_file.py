"""A multi-job run described in YAML, for `peft-mole train jobs.yaml` (same semantics as the Python API).

    model: Qwen/Qwen2.5-0.5B          # hub id or local path (loaded as SFTTrainer loads it: args.model_init_kwargs)
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
        dataset_config: main          # optional: a hub dataset's configuration (its `name`); not for local files
        dataset_split: train[:80%]    # optional (default "train"), also for a local file
        eval_dataset: data/math.jsonl # optional; eval_dataset_split: default "validation" (a local file: "train")
        learning_rate: 1.0e-4         # any JobConfig field
      - name: math2                   # a job that goes on from an earlier run's adapter (its config; `peft`
        type: lora                    # changes fields of it, as {lora_dropout: 0.1})
        init_adapter: runs/earlier/math   # or a hub id (owner/name), with optional
        init_adapter_kwargs: {subfolder: math}   # revision, subfolder, token, cache_dir (PeftModel.from_pretrained's)
        dataset: data/math.jsonl

A value of the wrong kind (`r: "4"`, `max_steps: ten`) is refused naming its field, from the annotations of the
config it goes to (the PEFT config or SFTConfig; JobConfig checks its own). `step_overhead_tokens` (top level) is
the trainer's argument: an int groups the steps by the rows' lengths alone, the same in every run (bit-identical
adapters from run to run on one machine); "auto" (default) groups by measured step times, so the adapters of
MixLoRA and DynMoLE jobs can differ between two runs by float rounding (their rows' padded widths differ).
`args` takes no `resume_from_checkpoint` (`peft-mole train FILE --resume` continues a run), and job names differ
in more than case (each names a folder).
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from dataclasses import dataclass, fields, replace
from typing import Any

from peft import LoraConfig

from peft_mole.multijob.jobs import LOCAL_PREFIXES, JobConfig, adapter_folder, saved_adapter_config
from peft_mole.multijob.trainer_args import check_max_steps
from peft_mole.tuners.dynmole.config import DynMoLEConfig
from peft_mole.tuners.mixlora.config import MixLoRAConfig

PEFT_TYPES = {"lora": LoraConfig, "mixlora": MixLoRAConfig, "dynmole": DynMoLEConfig}
RUN_KEYS = {"model", "tokenizer", "output_dir", "max_concurrent_jobs", "max_memory_gb", "step_overhead_tokens", "args",
            "jobs"}
DATA_KEYS = {"dataset", "dataset_config", "dataset_split", "eval_dataset", "eval_dataset_split"}
JOB_KEYS = {"name", "type", "peft"} | DATA_KEYS | {
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
    step_overhead_tokens: int | str | None = "auto"


def _unknown(where: str, given: dict, allowed: set[str]) -> None:
    extra = sorted(set(given) - allowed, key=repr)  # YAML keys may be ints or null as well as strings
    if extra:
        raise ValueError(f"{where}: unknown key(s) {extra}; allowed: {sorted(allowed)}")


def load_dataset_spec(spec: str, job: str, config: str | None = None, split: str | None = "train"):
    """A local data file (by extension) or a hub dataset, via `datasets.load_dataset`, with a clear error. `split`
    (a split name or slice, such as "train[:80%]"; a local file's rows are its "train" split) None: "train"."""
    from datasets import load_dataset

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"job {job!r}: dataset must be a file path or a hub dataset name, got {spec!r}")
    spec = os.path.expanduser(spec) if spec.startswith("~") else spec  # (the home folder, as for `model`)
    local_format = _local_format(spec)
    if local_format is not None:
        if not os.path.isfile(spec):
            raise ValueError(f"job {job!r}: dataset file {spec!r} does not exist")
        if os.path.getsize(spec) == 0:
            raise ValueError(f"job {job!r}: dataset file {spec!r} is empty")
        try:
            return load_dataset(local_format, data_files=spec, split=split or "train")
        except Exception as error:  # noqa: BLE001 — a split other than "train", a bad slice, a malformed line
            cause = error.__cause__ or error  # (datasets wraps the reader's error in DatasetGenerationError)
            raise ValueError(f"job {job!r}: dataset file {spec!r}, split {split!r}, cannot be read: "
                             f"{type(cause).__name__}: {cause}") from error
    try:
        return load_dataset(spec, config, split=split or "train")
    except Exception as error:  # noqa: BLE001 — re-raised with the job and what was tried
        raise ValueError(
            f"job {job!r}: cannot load dataset {spec!r} (not a local .json/.jsonl/.csv/.parquet file, and the hub "
            f"said: {type(error).__name__}: {error})"
        ) from error


def _names_list(hint) -> bool:
    return typing.get_origin(hint) is list and typing.get_args(hint) == (str,)


# an int field of a PEFT config takes a float too: several take a float where they annotate int (`lora_alpha`), and
# check it; SFTConfig's int fields do not (`max_length: 32.5` failed inside TRL, `max_steps: 2.5` trained 3 steps)
_SCALARS = {int: ((int, float), "an int"), float: ((int, float), "a number"), bool: ((bool,), "true or false"),
            str: ((str,), "a string"), type(None): ((type(None),), "null")}


def _local_format(spec) -> str | None:
    """The `datasets` builder of a local data file, by its extension (None: a hub dataset name)."""
    return _LOCAL_FORMATS.get(os.path.splitext(str(spec))[1].lower())


def _members(hint) -> tuple:
    """The types an annotation allows: a union's members, else the annotation itself."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def whole_floats_as_ints(config_class: type, values: dict) -> dict:
    """`values` with a whole float given for a field `config_class` annotates int alone made that int (`1e3` is
    a float in YAML 1.2: `max_steps: 1e3` means 1000)."""
    hints = typing.get_type_hints(config_class)

    def int_only(key) -> bool:
        return int in _members(hints.get(key)) and float not in _members(hints.get(key))

    return {k: int(v) if isinstance(v, float) and v.is_integer() and int_only(k) else v for k, v in values.items()}


def check_scalar_types(config_class: type, values: dict, where: str, int_takes_float: bool = True) -> None:
    """Refuse a value whose kind the field's annotation in `config_class` rules out (a string for `r: int`, a number
    for a string field), naming the field; fields annotated with other than int/float/bool/str/None (lists,
    mappings, enums) are left to the config's own checks. A bool is no number here, and with `int_takes_float`
    False neither is a float for a field annotated int alone (`max_steps: 2.5`; `whole_floats_as_ints` makes a
    whole one an int first)."""
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # noqa: BLE001 — annotations that do not resolve here: the config checks its values itself
        return
    for key, value in values.items():
        members = _members(hints.get(key))
        if not all(member in _SCALARS or _names_list(member) for member in members):
            continue
        if any(_names_list(member) for member in members) and isinstance(value, list):
            if all(isinstance(item, str) for item in value):
                continue
        allowed = tuple(t for member in members if member in _SCALARS for t in _SCALARS[member][0])
        if not int_takes_float and float not in members:
            allowed = tuple(t for t in allowed if t is not float)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in members):
            kinds = " or ".join(_SCALARS[member][1] if member in _SCALARS else "a list of strings"
                                for member in members)
            raise ValueError(f"{where}: {key} must be {kinds}, got {value!r}")


def _job(entry: Any, index: int) -> JobConfig:
    if not isinstance(entry, dict):
        raise ValueError(f"jobs[{index}] must be a mapping, got {entry!r}")
    name = entry.get("name", f"jobs[{index}]")
    _unknown(f"job {name!r}", entry, JOB_KEYS)
    for key in ("name", "type", "dataset"):
        if key not in entry:
            raise ValueError(f"job {name!r}: missing required key {key!r}")
    kind = entry["type"]
    if not isinstance(kind, str) or kind not in PEFT_TYPES:
        raise ValueError(f"job {name!r}: unknown type {kind!r}; allowed: {sorted(PEFT_TYPES)}")
    peft_kwargs = entry.get("peft") or {}
    if not isinstance(peft_kwargs, dict):
        raise ValueError(f"job {name!r}: peft must be a mapping of {PEFT_TYPES[kind].__name__} fields")
    known = {f.name for f in fields(PEFT_TYPES[kind])}
    _unknown(f"job {name!r} peft", peft_kwargs, known)
    check_scalar_types(PEFT_TYPES[kind], peft_kwargs, f"job {name!r} peft")
    saved = None  # with an init_adapter, `peft` (if any) changes fields of the saved adapter's config
    if entry.get("init_adapter") is not None:  # a hub id: its local snapshot (the kwargs taken), as JobConfig does
        try:
            folder = adapter_folder(f"job {name!r}", entry["init_adapter"], entry.get("init_adapter_kwargs"))
        except TypeError as error:  # a value of the wrong kind: a job file's errors are ValueErrors
            raise ValueError(str(error)) from error
        entry = {**entry, "init_adapter": folder, "init_adapter_kwargs": None}
        saved = saved_adapter_config(f"job {name!r}", entry["init_adapter"], None)
        if type(saved) is not PEFT_TYPES[kind]:
            raise ValueError(f"job {name!r}: type is {kind!r}, its init_adapter holds a {type(saved).__name__}")
    try:
        peft_config = PEFT_TYPES[kind](**peft_kwargs) if saved is None else replace(saved, **peft_kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"job {name!r} peft: {error}") from error
    overrides = whole_floats_as_ints(JobConfig, {k: v for k, v in entry.items()
                                                 if k not in {"name", "type", "peft"} | DATA_KEYS})
    local_files = [_local_format(entry[key]) is not None for key in ("dataset", "eval_dataset") if entry.get(key)]
    if entry.get("dataset_config") is not None and all(local_files):  # `datasets` ignores it for a local file
        raise ValueError(f"job {name!r}: dataset_config names a configuration of a hub dataset; this job's datasets "
                         f"are local files (got dataset_config={entry['dataset_config']!r})")
    train = load_dataset_spec(entry["dataset"], name, entry.get("dataset_config"), entry.get("dataset_split"))
    evaluation = None
    if entry.get("eval_dataset_split") is not None and not entry.get("eval_dataset"):
        raise ValueError(f"job {name!r}: eval_dataset_split needs an eval_dataset")
    if entry.get("eval_dataset"):
        local = _local_format(entry["eval_dataset"]) is not None
        evaluation = load_dataset_spec(entry["eval_dataset"], name, entry.get("dataset_config"),
                                       entry.get("eval_dataset_split") or ("train" if local else "validation"))
    try:
        return JobConfig(name=name, peft_config=peft_config, train_dataset=train, eval_dataset=evaluation, **overrides)
    except TypeError as error:  # a value of the wrong type (JobConfig names the job and the field)
        raise ValueError(str(error)) from error


def parse_run(data: Any) -> RunSpec:
    """Validate a parsed YAML document and build its JobConfigs (datasets are loaded here; paths are relative to
    the working directory, as in TRL's CLI, and `~` is the home folder)."""
    if not isinstance(data, dict):
        raise ValueError("the job file must be a YAML mapping with keys model, output_dir and jobs")
    _unknown("job file", data, RUN_KEYS)
    for key in ("model", "output_dir", "jobs"):
        if key not in data:
            raise ValueError(f"job file: missing required key {key!r}")
    data = dict(data)
    for key, what in (("model", "a path or a hub id"), ("tokenizer", "a path or a hub id"), ("output_dir", "a path")):
        value = data.get(key)
        if (value is not None or key != "tokenizer") and (not isinstance(value, str) or not value):
            raise ValueError(f"job file: {key} must be a non-empty string ({what}), got {value!r}")
        if isinstance(value, str) and value.startswith("~"):  # a home folder, as the shell would read it
            value = data[key] = os.path.expanduser(value)
        if key != "output_dir" and isinstance(value, str) and value.startswith(LOCAL_PREFIXES) \
                and not os.path.isdir(value):  # no hub id starts so (transformers said "Repo id must be in the form")
            raise ValueError(f"job file: {key} {value!r} is a local path, and no such folder exists")
    jobs = data["jobs"]
    if not isinstance(jobs, list) or not jobs:
        raise ValueError("job file: jobs must be a non-empty list")
    names = [j.get("name") for j in jobs if isinstance(j, dict) and isinstance(j.get("name"), str)]
    folded = [n.casefold() for n in names]  # (each names a folder: "A" and "a" are one on macOS and Windows)
    duplicates = sorted({n for n in names if folded.count(n.casefold()) > 1})
    if duplicates:
        raise ValueError(f"job file: job names must be unique, whatever their case (each names an output folder); "
                         f"used more than once: {duplicates}")
    args = data.get("args") or {}
    if not isinstance(args, dict):
        raise ValueError("job file: args must be a mapping of SFTConfig fields")
    if "resume_from_checkpoint" in args:  # (Trainer does not read it either: TRL's scripts pass it to train())
        raise ValueError("job file args: resume_from_checkpoint is not read from a job file; run `peft-mole train "
                         "FILE --resume` to continue each job from its latest checkpoint")
    from trl import SFTConfig

    _unknown("job file args", args, {f.name for f in fields(SFTConfig)} - {"output_dir"})
    args = whole_floats_as_ints(SFTConfig, args)
    check_scalar_types(SFTConfig, args, "job file args", int_takes_float=False)
    check_max_steps("job file args", args.get("max_steps", -1))  # (as a job's: Trainer takes any value <= 0)
    outputs = {os.path.realpath(os.path.join(data["output_dir"], str(n))): n for n in names}
    for entry in jobs:
        init = entry.get("init_adapter") if isinstance(entry, dict) else None
        where = os.path.realpath(os.path.expanduser(init)) if isinstance(init, str) else None
        if where in outputs:
            raise ValueError(f"job {entry.get('name')!r}: init_adapter {init!r} is the folder job "
                             f"{outputs[where]!r} of this file trains into; start from an earlier run's folder")
    built = [_job(entry, i) for i, entry in enumerate(jobs)]
    memory, concurrent = data.get("max_memory_gb"), data.get("max_concurrent_jobs")
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float))
                               or not math.isfinite(memory) or memory <= 0):
        raise ValueError(f"job file: max_memory_gb must be a finite number > 0 (GiB), got {memory!r}")
    if concurrent is not None and (isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1):
        raise ValueError(f"job file: max_concurrent_jobs must be an int >= 1, got {concurrent!r}")
    overhead = data.get("step_overhead_tokens", "auto")
    if overhead not in (None, "auto") and (isinstance(overhead, bool) or not isinstance(overhead, int) or overhead < 0):
        raise ValueError(f"job file: step_overhead_tokens must be 'auto', an int >= 0 or null, got {overhead!r}")
    return RunSpec(
        model=data["model"], tokenizer=data.get("tokenizer") or data["model"], output_dir=data["output_dir"],
        args=args, jobs=built,
        max_concurrent_jobs=concurrent,
        max_memory=None if memory is None else float(memory) * 2**30, step_overhead_tokens=overhead,
    )


def _yaml_loader():
    """PyYAML's SafeLoader that also reads 3e-3 and 1e5 as numbers (YAML 1.2, as TRL's CLI takes them; YAML 1.1
    needs a dot, so PyYAML reads them as strings, which SFTConfig accepts and the optimizer then fails on)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            """A key given twice in one mapping is refused (PyYAML keeps the last one silently: a second `jobs:`
            dropped the first list of jobs); a merge (`<<: *defaults`) may still be overridden."""
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, typing.Hashable):
                    continue  # (SafeLoader refuses it: "found unhashable key")
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "in a mapping", node.start_mark, f"the key {key!r} is given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    # YAML 1.2's exponent forms that YAML 1.1 reads as strings: 3e-3, 1.5e3, .5e3 (1.1 wants a dot and a signed one)
    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
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
