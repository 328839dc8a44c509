"""JobConfig: one adapter to train in a multi-job run — its PEFT config, data and own hyper-parameters.

Every training option left as None is taken from the trainer's `SFTConfig`; the resolved per-job arguments
(`JobConfig.training_args`) are what a plain `SFTTrainer` run of that job alone would use, which is what the
exactness tests compare against.
"""

from __future__ import annotations

import copy
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Any

from peft import LoraConfig, PeftConfig

from peft_mole.multijob.supported_jobs import check_job_name
from peft_mole.multijob.trainer_args import NUMBERS, check_lr_scheduler, check_max_steps, check_number
from peft_mole.tuners.expert_config import ExpertAdapterConfig
from peft_mole.tuners.load_checks import check_hub_weights

logger = logging.getLogger(__name__)

# JobConfig field -> TrainingArguments field it overrides
OVERRIDES = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "seed",
    "save_steps",
    "logging_steps",
    "eval_steps",
)


# numeric JobConfig fields -> (an int, the lowest value, whether the lowest value itself is refused)


@dataclass
class JobConfig:
    """One job of a `MultiJobTrainer` run.

    Args:
        name: adapter name and output folder (`output_dir/<name>/`); letters, digits, '_' and '-'.
        peft_config: `LoraConfig`, `MixLoRAConfig` or `DynMoLEConfig`; None with an `init_adapter` (its config).
        train_dataset: a dataset in any format `SFTTrainer` accepts (text, messages, prompt-completion), or a list
            of such rows (dicts), made a `datasets.Dataset`.
        eval_dataset: the same, for `<job>/eval_loss` and early stopping.
        priority: higher is admitted first when `max_concurrent_jobs` or memory is short; ties go by list order.
        early_stopping_patience: stop the job after this many evaluations without a lower eval loss (needs
            eval_dataset; the job is evaluated every eval_steps, default logging_steps, also with
            eval_strategy="no").
        learning_rate: this job's value of the `SFTConfig` field of the same name (None = the trainer's); so are
            per_device_train_batch_size, gradient_accumulation_steps, num_train_epochs, max_steps, warmup_steps,
            weight_decay, max_grad_norm, lr_scheduler_type, lr_scheduler_kwargs, seed, save_steps, logging_steps
            and eval_steps (which, as early_stopping_patience, needs an eval_dataset). A job's scheduler takes the
            job's lr_scheduler_kwargs, else the trainer's; the trainer builds each job's scheduler once when it is
            made, so a type that refuses the kwargs fails there.
        init_adapter: a saved adapter folder (`adapter_config.json` and `adapter_model.safetensors`: a job's
            output, a MixLoRA or DynMoLE adapter, or a plain PEFT LoRA one) or its hub id (downloaded into the hub
            cache; `init_adapter` then names the local snapshot) the job starts from instead of a fresh adapter, as
            `PeftModel.from_pretrained(base, folder, is_trainable=True)` starts SFTTrainer. With
            `peft_config=None` the folder's config is used; a given one must be of its type and fit its tensors
            (other dropout or alpha are taken as given). Optimizer and scheduler start afresh; a resume takes the
            job's checkpoint instead.
        init_adapter_kwargs: where in the Hub the adapter is, as the keyword arguments of
            `PeftModel.from_pretrained`: `revision` (a branch, tag or commit), `subfolder` (also of a local folder),
            `token`, `cache_dir`. Taken when the job is made: `init_adapter` then names the folder holding the
            adapter files (subfolder included) and this field is None.

    Example:
        >>> JobConfig(name="math", peft_config=LoraConfig(r=16), train_dataset=ds, learning_rate=2e-4)  # doctest: +SKIP
    """

    name: str
    peft_config: PeftConfig | None
    train_dataset: Any
    eval_dataset: Any = None
    priority: int = 0
    early_stopping_patience: int | None = None
    learning_rate: float | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    num_train_epochs: float | None = None
    max_steps: int | None = None
    warmup_steps: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    lr_scheduler_type: str | None = None
    lr_scheduler_kwargs: dict[str, Any] | None = None
    seed: int | None = None
    save_steps: float | None = None
    logging_steps: float | None = None
    eval_steps: float | None = None
    init_adapter: str | os.PathLike | None = None
    init_adapter_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_job_name(self.name)
        if self.init_adapter_kwargs is not None and self.init_adapter is None:
            raise ValueError(f"job {self.name!r}: init_adapter_kwargs needs an init_adapter")
        if self.init_adapter is not None:  # a hub id: its local snapshot from here on (kwargs taken: None)
            self.init_adapter = adapter_folder(f"job {self.name!r}", self.init_adapter, self.init_adapter_kwargs)
            self.init_adapter_kwargs = None
            self.peft_config = saved_adapter_config(f"job {self.name!r}", self.init_adapter, self.peft_config)
        if not isinstance(self.peft_config, (LoraConfig, ExpertAdapterConfig)):
            raise TypeError(
                f"job {self.name!r}: peft_config must be a LoraConfig, MixLoRAConfig or DynMoLEConfig (or None with "
                f"an init_adapter), got {type(self.peft_config).__name__}"
            )
        if self.train_dataset is None:
            raise ValueError(f"job {self.name!r}: train_dataset is required")
        for field in ("train_dataset", "eval_dataset"):  # rows as dicts: a datasets.Dataset, which TRL takes
            rows = getattr(self, field)
            if isinstance(rows, list) and rows and all(isinstance(row, dict) for row in rows):
                # (imported here: `import peft_mole` needs no `datasets`, which the GPU image lacks)
                from datasets import Dataset

                setattr(self, field, Dataset.from_list(rows))
        if not hasattr(self.train_dataset, "__len__"):
            raise TypeError(
                f"job {self.name!r}: train_dataset must have a length (a datasets.Dataset or a list), got "
                f"{type(self.train_dataset).__name__}: the scheduler plans each job's epochs and steps from it"
            )
        if len(self.train_dataset) == 0:
            raise ValueError(f"job {self.name!r}: train_dataset is empty")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TypeError(f"job {self.name!r}: priority must be an int, got {self.priority!r}")
        for name in NUMBERS:
            check_number(f"job {self.name!r}", name, getattr(self, name))
        if self.max_steps is not None:
            check_max_steps(f"job {self.name!r}", self.max_steps)
        evaluation = self.eval_dataset
        if evaluation is not None and (isinstance(evaluation, (str, bytes)) or not hasattr(evaluation, "__iter__")):
            raise TypeError(f"job {self.name!r}: eval_dataset must be a dataset (datasets.Dataset or IterableDataset), "
                            f"got {type(evaluation).__name__} {evaluation!r:.60}")
        if evaluation is not None and hasattr(evaluation, "__len__") and len(evaluation) == 0:
            raise ValueError(f"job {self.name!r}: eval_dataset is empty")
        if self.lr_scheduler_type is not None:
            check_lr_scheduler(self.lr_scheduler_type, f"job {self.name!r}: lr_scheduler_type")
        kwargs = self.lr_scheduler_kwargs
        if kwargs is not None and (not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs)):
            raise TypeError(f"job {self.name!r}: lr_scheduler_kwargs must be a dict of keyword arguments of its "
                            f"scheduler (such as {{'min_lr': 1e-6}}) or None, got {kwargs!r}")
        if self.early_stopping_patience is not None:
            patience = self.early_stopping_patience
            if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
                raise ValueError(
                    f"job {self.name!r}: early_stopping_patience must be an int >= 1, "
                    f"got {self.early_stopping_patience!r}"
                )
            if self.eval_dataset is None:
                raise ValueError(f"job {self.name!r}: early_stopping_patience needs an eval_dataset")
        if self.eval_steps is not None and self.eval_dataset is None:  # (it evaluated nothing, without a word)
            raise ValueError(f"job {self.name!r}: eval_steps needs an eval_dataset")

    def training_args(self, base, warn: bool = True):
        """The trainer's arguments with this job's overrides and `output_dir/<name>`.

        `warn`: log what the job sets to no effect (num_train_epochs under max_steps). A shallow copy with the
        fields set (re-running TrainingArguments' __post_init__ would reset accelerate's
        state in the middle of a run)."""
        args = copy.copy(base)
        for name in OVERRIDES:
            if getattr(self, name) is not None:
                setattr(args, name, copy.copy(getattr(self, name)))
        if self.eval_steps is None and self.logging_steps is not None and base.eval_steps == base.logging_steps:
            # TrainingArguments filled the trainer's eval_steps in from its logging_steps: the job's default eval
            # steps are the job's own logging_steps, as for the job trained alone
            args.eval_steps = self.logging_steps
        args.output_dir = os.path.join(base.output_dir, self.name)
        if warn and self.num_train_epochs is not None and self.max_steps is None and args.max_steps > 0:
            logger.warning("job %s: num_train_epochs=%s has no effect, since max_steps=%d (from the trainer's "
                           "arguments) takes precedence as in Trainer; set JobConfig(max_steps=-1) to train by "
                           "epochs", self.name, self.num_train_epochs, args.max_steps)
        return args


_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# `init_adapter_kwargs`: the keyword arguments of `PeftModel.from_pretrained` that say where an adapter is
INIT_ADAPTER_KWARGS = ("revision", "subfolder", "token", "cache_dir")
# a path that starts so is local, never a hub id (no hub id does)
LOCAL_PREFIXES = ("/", "./", "../", "~")


def check_init_adapter_kwargs(where: str, kwargs) -> dict[str, Any]:
    """`init_adapter_kwargs` as a dict of the keys allowed (`INIT_ADAPTER_KWARGS`), each a string (`token` may also
    be a bool, as in huggingface_hub)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"{where}: init_adapter_kwargs must be a dict with keys from {sorted(INIT_ADAPTER_KWARGS)}, "
                        f"got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - set(INIT_ADAPTER_KWARGS))
    if unknown:
        raise ValueError(f"{where}: init_adapter_kwargs has unknown keys {unknown}; allowed: "
                         f"{sorted(INIT_ADAPTER_KWARGS)}")
    for key, value in kwargs.items():
        allowed = (str, bool) if key == "token" else (str, os.PathLike) if key == "cache_dir" else (str,)
        if value is not None and (not isinstance(value, allowed) or value == ""):
            other = {"token": " or a bool", "cache_dir": " or a path"}.get(key, "")
            raise TypeError(f"{where}: init_adapter_kwargs[{key!r}] must be a non-empty string{other}, got {value!r}")
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if "subfolder" in kwargs:  # "math/", "./math" and "math" name one folder (a hub pattern needs the last)
        subfolder = posixpath.normpath(kwargs["subfolder"].replace("\\", "/")).strip("/")
        if kwargs["subfolder"].startswith("/") or subfolder in (".", "") or subfolder.split("/")[0] == "..":
            raise ValueError(f"{where}: init_adapter_kwargs['subfolder'] must be a relative path inside the "
                             f"adapter's folder or repo, got {kwargs['subfolder']!r}")
        kwargs["subfolder"] = subfolder
    return kwargs


def adapter_folder(where: str, name_or_path, kwargs: dict[str, Any] | None = None):
    """The local folder of an `init_adapter`: a folder as given (`~` expanded); a hub id (`owner/name`, not a
    folder here) is downloaded as `PeftModel.from_pretrained` downloads an adapter, by
    `huggingface_hub.snapshot_download` of its adapter files into the hub cache (one revision for both; offline,
    `HF_HUB_OFFLINE=1`, from the cache), and its snapshot folder returned. `kwargs` (`init_adapter_kwargs`): the
    `revision`, `subfolder`, `token` and `cache_dir` of the download; of a local folder, `subfolder` alone. A repo
    that holds a pickle adapter_model.bin alone is refused as `PeftModel.from_pretrained` refuses it, with how to
    convert it."""
    kwargs = check_init_adapter_kwargs(where, kwargs)
    subfolder = kwargs.get("subfolder")
    if isinstance(name_or_path, str) and name_or_path.startswith("~"):
        name_or_path = os.path.expanduser(name_or_path)
    if not isinstance(name_or_path, str) or os.path.isdir(name_or_path) \
            or name_or_path.startswith(LOCAL_PREFIXES) or name_or_path.count("/") != 1:  # (a Path: always local)
        hub_only = sorted(set(kwargs) - {"subfolder"})
        if hub_only:
            raise ValueError(f"{where}: init_adapter_kwargs {hub_only} apply to a hub id; init_adapter "
                             f"{str(name_or_path)!r} is a local path")
        if subfolder is not None and isinstance(name_or_path, (str, os.PathLike)):
            return os.path.join(name_or_path, subfolder)
        return name_or_path  # a folder, a missing local path or no hub id: `saved_adapter_config` names it
    import huggingface_hub

    files = [f"{subfolder}/{file}" if subfolder else file for file in _ADAPTER_FILES]
    download = {key: value for key, value in kwargs.items() if key != "subfolder"}
    try:
        folder = huggingface_hub.snapshot_download(name_or_path, allow_patterns=files, **download)
    except Exception as error:  # noqa: BLE001 — no such repo or revision, offline and not cached, no network
        at = "".join(f", {key} {kwargs[key]!r}" for key in ("revision", "subfolder") if key in kwargs)
        raise ValueError(f"{where}: init_adapter {name_or_path!r}{at} is no local folder, and as a hub id it cannot "
                         f"be downloaded ({type(error).__name__}: {error})") from error
    if subfolder is not None:
        folder = os.path.join(folder, subfolder)
    if not os.path.isfile(os.path.join(folder, _ADAPTER_FILES[1])):
        try:  # a repo saved as a pickle alone: say so, with the way to convert it (else the folder's check names it)
            check_hub_weights(name_or_path, subfolder, kwargs.get("revision"), kwargs.get("token"),
                              cache_dir=kwargs.get("cache_dir"))
        except ValueError as error:
            raise ValueError(f"{where}: init_adapter: {error}") from None
    return folder


def saved_adapter_config(where: str, folder, given: PeftConfig | None) -> PeftConfig:
    """The config a job started from the saved adapter in `folder` trains with: `given`, if of the saved adapter's
    type, else the folder's own, for training (`inference_mode` False; a LoRA's random initialisation, which
    the loaded weights replace, PEFT's default)."""
    if not isinstance(folder, (str, os.PathLike)) or not os.path.isdir(folder):
        raise ValueError(f"{where}: init_adapter must be an adapter folder or a hub id, got {folder!r}")
    for file in _ADAPTER_FILES:
        if not os.path.isfile(os.path.join(folder, file)):
            hint = "; `peft-mole convert-bin` converts a trusted adapter_model.bin" if os.path.isfile(
                os.path.join(folder, "adapter_model.bin")) else ""
            raise ValueError(f"{where}: init_adapter {str(folder)!r} has no {file} (an adapter folder as "
                             f"save_pretrained writes it{hint})")
    try:
        saved = PeftConfig.from_pretrained(str(folder))
    except Exception as error:  # noqa: BLE001 — malformed JSON, an unknown peft_type (a MoE-PEFT folder: convert it)
        raise ValueError(f"{where}: init_adapter {str(folder)!r}: its adapter_config.json cannot be read as a PEFT "
                         f"config ({type(error).__name__}: {error}); `peft-mole convert` converts MoE-PEFT "
                         "adapters") from error
    if given is None:
        saved.inference_mode = False
        if isinstance(saved, LoraConfig) and saved.init_lora_weights in (False, "gaussian"):
            saved.init_lora_weights = True
        return saved
    if type(given) is not type(saved):
        raise ValueError(f"{where}: init_adapter {str(folder)!r} holds a {type(saved).__name__} adapter, peft_config "
                         f"is a {type(given).__name__}")
    return given
