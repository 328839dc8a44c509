"""Import and export of the reference implementations' adapter formats (MoE-PEFT / the `mixlora` package)."""

from peft_mole.interop.moe_peft import config_from_moe_peft, export_moe_peft, import_moe_peft

__all__ = ["config_from_moe_peft", "export_moe_peft", "import_moe_peft"]
