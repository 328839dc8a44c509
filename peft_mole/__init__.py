"""peft-mole: Mixture-of-LoRA-Experts methods as native Hugging Face PEFT types.

Importing the package registers its PEFT types, after which `get_peft_model`, `PeftModel.from_pretrained`,
`AutoPeftModelForCausalLM` and TRL's `SFTTrainer(peft_config=...)` accept them like any PEFT method. It also registers
the attention implementation `"sdpa_packed"` with transformers (`peft_mole.packed_attention`).
"""

from peft_mole.diagnostics import RouterStatsCallback
from peft_mole.finite_check import check_finite
from peft_mole.forward_context import BASE_ROW
from peft_mole.model_card import add_eval_results, push_to_hub
from peft_mole.multijob import JobConfig, MultiJobModel
from peft_mole.packed_attention import PACKED_SDPA
from peft_mole.tuners.dynmole import DynMoLEConfig, DynMoLEModel
from peft_mole.tuners.load_checks import convert_bin_adapter
from peft_mole.tuners.mixlora import MixLoRAConfig, MixLoRAModel

__version__ = "0.1.0.dev0"

__all__ = [
    "BASE_ROW", "add_eval_results", "check_finite", "convert_bin_adapter", "DynMoLEConfig", "DynMoLEModel", "JobConfig", "MixLoRAConfig", "MixLoRAModel", "MultiJobModel",
    "MultiJobTrainer", "PACKED_SDPA", "RouterStatsCallback", "__version__", "push_to_hub",
]


def __getattr__(name: str):
    if name == "MultiJobTrainer":  # imports TRL: only when asked for
        from peft_mole.multijob.trainer import MultiJobTrainer

        return MultiJobTrainer
    raise AttributeError(name)
