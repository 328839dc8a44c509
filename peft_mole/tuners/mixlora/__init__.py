"""MixLoRA (Li et al. 2024, arXiv:2404.15159): LoRA experts in the frozen MLP, top-k router, attention LoRA."""

from peft_mole.registration import register_method
from peft_mole.tuners.mixlora.attention import LoraLinear
from peft_mole.tuners.mixlora.config import MixLoRAConfig
from peft_mole.tuners.mixlora.layer import MixLoRAMLP
from peft_mole.tuners.mixlora.model import MixLoRAModel

register_method("peft_mole_mixlora", config_cls=MixLoRAConfig, model_cls=MixLoRAModel, prefix=MixLoRAModel.prefix)

__all__ = ["LoraLinear", "MixLoRAConfig", "MixLoRAMLP", "MixLoRAModel"]
