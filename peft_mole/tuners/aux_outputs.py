"""Model outputs that carry the router aux loss as fields of their own class.

A transformers `ModelOutput` is a dataclass and a dict, registered as a pytree node that is rebuilt as
`type(output)(**dict(output))`: what DDP does with a forward's output when it looks for unused parameters (Trainer's
default for a PEFT model). An entry set on an output whose class has no such field makes that rebuild fail, so
`with_fields` returns the output as an instance of a subclass of its class that declares the missing fields (one
subclass per class and set of names, registered as a pytree node by `ModelOutput.__init_subclass__`). The
subclass keeps everything else: `isinstance` checks, attribute and key access, `to_tuple()` order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers.utils import ModelOutput

_SUBCLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _with_declared(cls: type, names: tuple[str, ...]) -> type:
    key = (cls, names)
    if key not in _SUBCLASSES:
        fields = [(name, Any, dataclasses.field(default=None)) for name in names]
        _SUBCLASSES[key] = dataclasses.make_dataclass(cls.__name__, fields, bases=(cls,),
                                                      namespace={"__module__": __name__})
    return _SUBCLASSES[key]


def with_fields(outputs: ModelOutput, **values: Any) -> ModelOutput:
    """`outputs` with `values` set, as an instance of its class where that class declares every name in `values`
    as a field, else of a subclass that declares the missing ones (module docstring)."""
    declared = {field.name for field in dataclasses.fields(outputs)} if dataclasses.is_dataclass(outputs) else set()
    missing = tuple(name for name in values if name not in declared)
    if missing:
        outputs = _with_declared(type(outputs), missing)(**dict(outputs.items()))
    for name, value in values.items():
        outputs[name] = value
    return outputs
