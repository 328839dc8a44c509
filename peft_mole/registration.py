"""Registration of peft-mole's methods as PEFT types.

PEFT looks a method up by its `PeftType` member (config class, tuner class and parameter prefix mappings).
`peft.utils.register_peft_method` fills the mappings but only accepts names that are already members of the
`PeftType` str-Enum, and PEFT has no public way to add members. `add_peft_type` adds one member to the enum
(the only step outside PEFT's API), then `register_method` calls PEFT's own `register_peft_method`. It also wraps
`PeftModel.load_adapter` (`tuners.weight_loading`), so that the load checks of our configs
run where PEFT reads no config of ours (`config=` given, an adapter name the model already has).

The type names carry the package name (`PEFT_MOLE_MIXLORA`), for two reasons:
- a tool that loads one of our adapters without `import peft_mole` fails inside PEFT with
  `KeyError: 'PEFT_MOLE_MIXLORA'`, which names the package to install and import;
- the reference implementation MoE-PEFT writes `"peft_type": "MIXLORA"` in a different format, so its
  checkpoints are never mistaken for ours.
"""

from __future__ import annotations

from peft import PeftType
from peft.utils import register_peft_method


def add_peft_type(name: str) -> PeftType:
    """Add `name` (upper case) to `peft.PeftType` and return the member; idempotent.

    Example:
        >>> add_peft_type("PEFT_MOLE_MIXLORA").value
        'PEFT_MOLE_MIXLORA'
    """
    if not name.isupper() or not name.isidentifier():
        raise ValueError(f"name must be an upper-case identifier, got {name!r}")
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses to bind members after creation
    return member


def register_method(name: str, config_cls: type, model_cls: type, prefix: str) -> PeftType:
    """Make `name` a PEFT method: add the `PeftType` member and register config, tuner and prefix.

    Calling it again with the same classes registers nothing new. Classes of the same module and name as the
    registered ones (their module reloaded: `importlib.reload`, a notebook's autoreload) replace them; PEFT's
    `register_peft_method` would raise "There is already PEFT method called ...". Another module's classes under
    the same name are refused as PEFT refuses them.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from peft_mole.tuners.weight_loading import guard_weight_loading

    guard_weight_loading()
    peft_type = add_peft_type(name.upper())
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    def same(a, b) -> bool:
        return a is not None and (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)

    same_class = (same(registered, config_cls) and same(tuner, model_cls)
                  and getattr(model_cls, "prefix", prefix) == prefix)
    if registered is None or not same_class:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    elif registered is not config_cls:  # reloaded
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type], PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = config_cls, model_cls
    return peft_type
