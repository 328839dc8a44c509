"""DynMoLEModel: the MixLoRA tuner with DynMoLE's layers (prefix `dynmole_`); the rule and the aux loss come
from `DynMoLEConfig` (hybrid Tsallis routing, entropy + load-balance loss)."""

from peft_mole.tuners.dynmole.layer import DynMoLELoraLinear, DynMoLEMLP, DynMoLEProjection
from peft_mole.tuners.mixlora.model import MixLoRAModel


class DynMoLEModel(MixLoRAModel):
    """Tuner for `DynMoLEConfig`. Example: `get_peft_model(base, DynMoLEConfig(num_experts=8))`."""

    prefix = "dynmole_"
    mlp_layer_cls = DynMoLEMLP
    projection_layer_cls = DynMoLEProjection
    attention_layer_cls = DynMoLELoraLinear
    tuner_layer_cls = (DynMoLELoraLinear, DynMoLEMLP, DynMoLEProjection)
