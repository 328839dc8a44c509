"""Which of a job's tensors get weight decay: Trainer's rule (`get_decay_parameter_names`), applied to the names
the job's tensors have when the adapter is trained alone.

Trainer leaves out of weight decay every parameter whose name matches "bias", "layernorm", "rmsnorm", a "norm"
segment or "_norm" (and those inside `nn.LayerNorm`). Alone, a job's tensors are named after PEFT's adapter
("...q_proj.lora_A.default.weight"); in a multi-job model the job's name takes the adapter's place
("...q_proj.mixlora_A.<job>.weight"), so a job named "debias", "q_norm" or "rmsnorm_ablation" had every tensor
left out of decay. The rule is therefore asked about a stand-in module tree whose names carry "default" where the
job's name stands, and a subclass's own `get_decay_parameter_names` is asked the same way. The stand-in modules
are plain `nn.Module`s: a rule of a subclass that decides by module type (`isinstance(module, nn.Embedding)`)
sees none of the real types there (Trainer's own rule leaves out `nn.LayerNorm`s, which hold no adapter tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def _stand_in_name(name: str, job: str, prefix: str) -> str:
    """`name` with the job's segment (the one after a `prefix`* container) as PEFT's "default" adapter."""
    parts = name.split(".")
    return ".".join("default" if part == job and i and parts[i - 1].startswith(prefix) else part
                    for i, part in enumerate(parts))


def decayed_names(decay_parameter_names: Callable[[nn.Module], list[str]], names: Iterable[str], job: str,
                  prefix: str) -> set[str]:
    """The `names` (a job's parameters in the multi-job model) that Trainer's rule decays when the job is alone."""
    probe, alias = nn.Module(), {}
    for name in names:
        parts = _stand_in_name(name, job, prefix).split(".")
        module = probe
        for part in parts[:-1]:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        module.register_parameter(parts[-1], nn.Parameter(torch.empty(0)))  # (trainable, as the job's are)
        alias[".".join(parts)] = name
    return {alias[n] for n in decay_parameter_names(probe) if n in alias}


__all__ = ["decayed_names"]
