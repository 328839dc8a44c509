"""What a multi-job job may be: its name (it names the adapter, the layers' entries and its output folder) and, for a
LoRA job, the LoRA options the row-aware `LoraLinear` supports. Checked when a job is made (`JobConfig`) and when its
adapter is added (`MultiJobModel`), before anything is built."""

from __future__ import annotations

import re
from dataclasses import fields

from peft import LoraConfig
from torch import nn

JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def check_job_name(name) -> None:
    if not isinstance(name, str) or not JOB_NAME.match(name) or name == "__base__":
        raise ValueError(
            f"job name {name!r} is not allowed: use letters, digits, '_' and '-' (it names the adapter and its "
            "output folder; '__base__' is reserved)"
        )
    if hasattr(nn.ModuleDict(), name) or hasattr(nn.ParameterDict(), name):  # the layers' entries per job
        raise ValueError(f"job name {name!r} is not allowed: it is an attribute of torch modules, which the layers' "
                         f"entries per job cannot take; choose another, e.g. {name + '_job'!r}")


# The LoraConfig fields a multi-job LoRA job may set: what its row-aware layers compute, and bookkeeping. Any other
# field set to other than its default is refused (before 2026-12-08 a list of known options was refused and the
# rest passed: `lora_bias`, `layer_replication`, aLoRA, KaSA, trainable tokens and others trained plain LoRA while
# `save_job` wrote the option, so the saved adapter loaded as another model or not at all).
SUPPORTED_LORA_FIELDS = frozenset({
    "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "init_lora_weights", "task_type", "peft_type", "auto_mapping", "peft_version",
    "base_model_name_or_path", "revision", "inference_mode", "runtime_config",
})


def check_lora_config(name: str, config: LoraConfig) -> None:
    """The LoRA options a multi-job LoRA adapter supports (plain LoRA on linear layers: `SUPPORTED_LORA_FIELDS`)."""
    defaults = LoraConfig()
    bad = [f.name for f in fields(LoraConfig) if f.name not in SUPPORTED_LORA_FIELDS
           and getattr(config, f.name, None) != getattr(defaults, f.name, None)]
    if bad:
        raise ValueError(
            f"job {name!r}: LoraConfig options {bad} are not supported in multi-job training; supported: r, "
            "lora_alpha, lora_dropout, use_rslora, target_modules, layers_to_transform, init_lora_weights=True"
        )
    if isinstance(config.r, bool) or not isinstance(config.r, int) or config.r <= 0:
        raise ValueError(f"job {name!r}: LoraConfig r must be a positive integer, got {config.r!r}")
    if config.init_lora_weights is not True:
        raise ValueError(f"job {name!r}: init_lora_weights must be True (Kaiming A, zero B), "
                         f"got {config.init_lora_weights!r}")


__all__ = ["JOB_NAME", "check_job_name", "check_lora_config"]
