"""DynMoLE (Li et al. 2025): Tsallis-entropy hybrid routing and entropy loss on LoRA experts."""

from peft_mole.registration import register_method
from peft_mole.tuners.dynmole.config import DynMoLEConfig
from peft_mole.tuners.dynmole.model import DynMoLEModel

register_method("peft_mole_dynmole", config_cls=DynMoLEConfig, model_cls=DynMoLEModel, prefix=DynMoLEModel.prefix)

__all__ = ["DynMoLEConfig", "DynMoLEModel"]
