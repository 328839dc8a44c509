"""DynMoLE's layers: MixLoRA's, with the `dynmole_` prefix (the routing rule comes from the config)."""

from peft_mole.tuners.mixlora.attention import LoraLinear
from peft_mole.tuners.mixlora.layer import MixLoRAMLP
from peft_mole.tuners.mixlora.projection import MoELoraLinear


class DynMoLEMLP(MixLoRAMLP):
    prefix = "dynmole_"


class DynMoLEProjection(MoELoraLinear):
    prefix = "dynmole_"


class DynMoLELoraLinear(LoraLinear):
    prefix = "dynmole_"
