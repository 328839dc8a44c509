"""The load checks of `ExpertAdapterConfig.from_pretrained` on every path PEFT loads an adapter's weights by.

`PeftModel.from_pretrained(base, path)` reads the config through `ExpertAdapterConfig.from_pretrained`, which checks
the folder first (`load_checks`: safetensors only, a readable file, every factor with its partner, every field that
shapes the tensors stated). Two common paths read no config of ours and went round those checks:
`PeftModel.from_pretrained(base, path, config=PeftConfig.from_pretrained(path))` and `model.load_adapter(path, name)`
for a name the model already has. Both take the weights from PEFT's `load_peft_weights`, which falls back to
`torch.load` of a pickle `adapter_model.bin`. `guard_weight_loading` wraps `PeftModel.load_adapter`: where the
model already has that adapter as a MixLoRA or DynMoLE one, the same checks run before PEFT reads a file; any other
adapter loads as PEFT loads it.
"""

from __future__ import annotations

import functools
import json
import os

from peft_mole.tuners.load_checks import (
    SAFETENSORS_NAME,
    check_complete_factors,
    check_saved_keys,
    check_weights_file,
)


def _saved_config(model_id: str, kwargs: dict) -> dict | None:
    """The adapter_config.json of `model_id` (a local folder, or a Hub repo's cached or downloaded file), or None
    where there is none to read: then PEFT's own loader decides, as before."""
    subfolder = kwargs.get("subfolder") or ""
    folder = os.path.join(model_id, subfolder)
    try:
        if os.path.isdir(folder):
            path = os.path.join(folder, "adapter_config.json")
        else:
            from huggingface_hub import hf_hub_download

            hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
            path = hf_hub_download(model_id, "adapter_config.json", subfolder=subfolder or None, **hub_kwargs)
        with open(path, encoding="utf-8") as file:
            saved = json.load(file)
    except Exception:  # noqa: BLE001 — no readable config: not ours to check
        return None
    return saved if isinstance(saved, dict) else None


def check_expert_adapter_folder(model_id: str, kwargs: dict) -> None:
    """Where `model_id` holds a MixLoRA or DynMoLE adapter, the checks its config's `from_pretrained` runs."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from peft_mole.tuners.expert_config import ExpertAdapterConfig

    saved = _saved_config(str(model_id), kwargs)
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(saved.get("peft_type")) if saved else None
    if not (isinstance(config_cls, type) and issubclass(config_cls, ExpertAdapterConfig)):
        return
    check_saved_keys(config_cls.__name__, saved, config_cls.REQUIRED_ON_LOAD)
    subfolder = kwargs.get("subfolder")
    names = check_weights_file(str(model_id), subfolder, kwargs.get("revision"), kwargs.get("token"),
                               bool(kwargs.get("local_files_only")), kwargs.get("cache_dir"))
    if names is not None:
        check_complete_factors(names, bool(saved.get("use_dora")),
                               os.path.join(str(model_id), subfolder or "", SAFETENSORS_NAME))


def guard_weight_loading() -> None:
    """Wrap `PeftModel.load_adapter`: where it loads the weights of an adapter the model already has as a MixLoRA or
    DynMoLE adapter (a `config=` given to `from_pretrained`, or a name loaded again), `check_expert_adapter_folder`
    runs first; a new name's config is read by its own `from_pretrained`, which checks; any other adapter loads as
    PEFT loads it, with no extra read. Idempotent."""
    from peft import PeftModel

    from peft_mole.tuners.expert_config import ExpertAdapterConfig

    load_adapter = PeftModel.load_adapter
    if getattr(load_adapter, "_peft_mole_guard", False):
        return

    @functools.wraps(load_adapter)
    def guarded(self, model_id, adapter_name, *args, **kwargs):
        if isinstance(self.peft_config.get(adapter_name), ExpertAdapterConfig):
            check_expert_adapter_folder(model_id, kwargs)
        return load_adapter(self, model_id, adapter_name, *args, **kwargs)

    guarded._peft_mole_guard = True
    PeftModel.load_adapter = guarded


__all__ = ["check_expert_adapter_folder", "guard_weight_loading"]
