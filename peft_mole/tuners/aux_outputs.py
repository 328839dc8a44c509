"""Model outputs that carry the router aux loss as fields of their own class.

A transformers `ModelOutput` is a dataclass and a dict, registered as a pytree node that is rebuilt as
`type(output)(**dict(output))`: what DDP does with a forward's output when it looks for unused parameters (Trainer's
default for a PEFT model). An entry set on an output whose class has no such field makes that rebuild fail, so
`with_fields` returns the output as an instance of a subclass of its class that declares the missing fields (one
subclass per class and set of names, registered as a pytree node by `ModelOutput.__init_subclass__`, and as an
attribute of this module so that it pickles). The subclass keeps everything else: `isinstance` checks, attribute
and key access, `to_tuple()` order.

Classes cannot be made while torch.compile traces a forward, so the subclasses of the outputs of causal LMs and of
TRL's fused LM head are made beforehand (`declare_known`); under tracing, an output of another class gets the
entries set as items (as before such subclasses existed). Outputs that are not dataclasses (a plain dict) get
items too.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from transformers.utils import ModelOutput

AUX_FIELDS = ("aux_loss", "aux_loss_per_adapter")
_SUBCLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def declare(cls: type, names: tuple[str, ...] = AUX_FIELDS) -> type:
    """The subclass of ModelOutput dataclass `cls` that declares `names` as fields too (`cls` where it does)."""
    key = (cls, names)
    if key not in _SUBCLASSES:
        declared = {field.name for field in dataclasses.fields(cls)}
        missing = [name for name in names if name not in declared]
        subclass = cls
        if missing:
            module = sys.modules[__name__]
            name = f"{cls.__name__}With{''.join(part.title() for part in '_'.join(missing).split('_'))}"
            while hasattr(module, name):
                name += "_"
            fields = [(field, Any, dataclasses.field(default=None)) for field in missing]
            subclass = dataclasses.make_dataclass(name, fields, bases=(cls,), namespace={"__module__": __name__})
            setattr(module, name, subclass)
        _SUBCLASSES[key] = subclass
    return _SUBCLASSES[key]


def with_fields(outputs, **values: Any):
    """`outputs` with `values` set: as an instance of a class that declares every name in `values` as a field where
    `outputs` is a ModelOutput dataclass (module docstring), else by item."""
    if isinstance(outputs, ModelOutput):
        cls, names = type(outputs), tuple(values)
        subclass = _SUBCLASSES.get((cls, names))  # (a dict lookup: traceable)
        if subclass is None and not torch.compiler.is_compiling() and dataclasses.is_dataclass(outputs):
            subclass = declare(cls, names)
        if subclass is not None and subclass is not cls:
            outputs = subclass(**dict(outputs.items()))
    for name, value in values.items():
        outputs[name] = value
    return outputs


def declare_known() -> None:
    """Make the subclasses of the outputs a training forward returns: transformers' causal LMs' and, once TRL is
    imported (it is not imported here), its fused head's. Called on import and when an adapter is injected."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    declare(CausalLMOutputWithPast)
    fused = getattr(sys.modules.get("trl.trainer.utils"), "FusedCausalLMOutput", None)
    if isinstance(fused, type) and issubclass(fused, ModelOutput) and dataclasses.is_dataclass(fused):
        declare(fused)


declare_known()
