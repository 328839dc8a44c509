"""What a multi-job job may be: its name (it names the adapter, the layers' entries and its output folder) and, for a
LoRA job, the LoRA options the row-aware `LoraLinear` supports. Checked when a job is made (`JobConfig`) and when its
adapter is added (`MultiJobModel`), before anything is built."""

from __future__ import annotations

import re

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


def check_lora_config(name: str, config: LoraConfig) -> None:
    """The LoRA options a multi-job LoRA adapter supports (plain LoRA on linear layers)."""
    unsupported = {
        "use_dora": config.use_dora,
        "bias": config.bias != "none",
        "modules_to_save": bool(config.modules_to_save),
        "target_parameters": bool(getattr(config, "target_parameters", None)),
        "rank_pattern": bool(config.rank_pattern),
        "alpha_pattern": bool(config.alpha_pattern),
        "fan_in_fan_out": config.fan_in_fan_out,
    }
    bad = [k for k, v in unsupported.items() if v]
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
