"""Checks that make loading a saved adapter fail early and clearly instead of loading it wrongly.

- `check_saved_keys`: adapter_config.json must state every field that shapes the adapter's tensors (a missing one
  would silently take its default and mismatch the weights); unknown keys only warn (PEFT ignores them).
- `check_weights_file`: in a local adapter folder, adapter_model.safetensors must be a readable safetensors file
  (truncated or corrupted files are named); a pickle `adapter_model.bin` alone is refused, in a local folder or a
  Hub repo (asked before PEFT downloads it) — `convert_bin_adapter` is the explicit opt-in that turns it into safetensors (reading it with `torch.load(weights_only=True)`).
- `check_every_tensor_given`: the weights loaded into an adapter (from a file, or `set_peft_model_state_dict`) must
  hold every tensor the adapter has; a missing router, layer or factor would keep its initial values (or, loaded
  with `low_cpu_mem_usage`, stay on the meta device) while PEFT only warns.
- `check_base_shape`: the base an adapter is loaded onto must have the hidden size, MLP size and layer count of the
  base it was trained on (recorded in the config as `base_model_shape`); another vocabulary or model type (e.g. a
  Llama adapter on a Gemma base of the same sizes, whose MLP activation differs) only warns.
"""

from __future__ import annotations

import os
import warnings

from torch import nn

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers")


def check_saved_keys(cls_name: str, saved: dict, required: tuple[str, ...]) -> None:
    missing = [key for key in required if key not in saved]
    if missing:
        raise ValueError(
            f"adapter_config.json of this {cls_name} lacks {missing}; these fields shape the saved tensors, so the "
            f"adapter cannot be rebuilt without them (needed: {list(required)})"
        )


def check_weights_file(path: str, subfolder: str | None = None, revision: str | None = None,
                       token: str | bool | None = None, local_files_only: bool = False,
                       cache_dir: str | None = None) -> list[str] | None:
    """Validate the weights file of a local adapter folder and return its tensor names; for a Hub id, refuse a repo
    that holds a pickle adapter_model.bin and no safetensors (`check_hub_weights`) and return None."""
    folder = os.path.join(path, subfolder) if subfolder else path
    if not os.path.isdir(folder):
        check_hub_weights(path, subfolder, revision, token, local_files_only, cache_dir)
        return None
    weights = os.path.join(folder, SAFETENSORS_NAME)
    if os.path.isfile(weights):
        from safetensors import safe_open

        try:
            with safe_open(weights, framework="pt") as f:
                names = list(f.keys())
                for name in names:
                    f.get_slice(name).get_shape()
        except Exception as error:  # noqa: BLE001 — re-raised with the file and what to do
            raise ValueError(
                f"{weights} is not a readable safetensors file (truncated or corrupted: {error}); load an earlier "
                "checkpoint of this adapter"
            ) from error
        size = os.path.getsize(weights)
        if not names or size < 16:
            raise ValueError(f"{weights} holds no tensors; the adapter was not saved completely")
        return names
    if os.path.isfile(os.path.join(folder, PICKLE_NAME)):
        raise ValueError(
            f"{folder} holds only a pickle {PICKLE_NAME}; peft-mole loads adapters from safetensors only. If you "
            f"trust the file, convert it once with `peft_mole.convert_bin_adapter({folder!r})` (or "
            f"`peft-mole convert-bin {folder}`), which reads it with torch.load(weights_only=True)"
        )


def check_complete_factors(names: list[str], use_dora: bool, where: str) -> None:
    """Every saved LoRA factor has its partner (`..._lora_A` and `..._lora_B` of the experts, `<prefix>A` and
    `<prefix>B` of the attention LoRA) and, for DoRA experts, its `{proj}_magnitude`. A file missing some was cut
    or edited: PEFT would keep the missing tensors' initial values with a warning (and fail on the meta device with
    `low_cpu_mem_usage=True`), a half-trained adapter that looks loaded."""
    present, missing = set(names), []
    for name in names:
        for own, partner in (("_lora_A", "_lora_B"), ("_lora_B", "_lora_A"), ("_A", "_B"), ("_B", "_A")):
            if name.endswith(own):
                stem = name[: -len(own)]
                missing += [stem + partner] if stem + partner not in present else []
                if use_dora and own == "_lora_A" and stem + "_magnitude" not in present:
                    missing.append(stem + "_magnitude")
                break
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} tensor(s) its other tensors and config (use_dora={use_dora}) "
                         f"need, e.g. {sorted(missing)[:3]}; the adapter was not saved completely")


def adapter_of(name: str, prefix: str) -> str | None:
    """The adapter a parameter or key belongs to: the name after its first `prefix` container
    (`...mlp.mixlora_router.<adapter>.weight`), or None for a name outside the adapter's modules."""
    parts = name.split(".")
    return next((parts[i + 1] for i, part in enumerate(parts[:-1]) if part.startswith(prefix)), None)


def check_every_tensor_given(model: nn.Module, state_dict: dict, prefix: str, adapter_name: str) -> None:
    """Refuse adapter weights that lack a tensor of `adapter_name` among the parameters of `model` (those under a
    module whose name starts with `prefix`, e.g. `mixlora_`), or hold one of `adapter_name`'s that the model has not
    (saved from an adapter with more layers, e.g. loaded with `config=` onto a smaller base: PEFT drops them). Keys
    are compared without PEFT's `base_model.model.` prefix, which a state dict has and a model made by
    `inject_adapter_in_model` has not."""
    def bare(name: str) -> str:
        return name.removeprefix("base_model.model.")

    def ours(name: str) -> bool:
        return any(part.startswith(prefix) for part in name.split(".")[:-1])

    given = {bare(key) for key in state_dict if ours(key)}  # (a key PEFT could not map keeps its file name)
    extra = sorted(given - {bare(name) for name in model.state_dict(keep_vars=True)})
    owned = {bare(name) for name, _ in model.named_parameters() if adapter_of(name, prefix) == adapter_name}

    def shown(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    if extra:
        raise ValueError(
            f"the weights loaded into adapter {adapter_name!r} hold {len(extra)} tensor(s) it does not have "
            f"({shown(extra)}): they were saved from an adapter on another base (more layers) or with other layers "
            "or projections (layers_to_transform, expert_target_modules, attn_target_modules)"
        )
    missing = sorted(owned - given)
    if missing:
        raise ValueError(
            f"the weights loaded into adapter {adapter_name!r} lack {len(missing)} of its tensors "
            f"({shown(missing)}); they would keep their initial values. The adapter file is incomplete, or was saved "
            "from an adapter with other layers or projections (layers_to_transform, expert_target_modules, "
            "attn_target_modules)"
        )


def check_hub_weights(repo_id: str, subfolder: str | None, revision: str | None, token: str | bool | None,
                      local_files_only: bool = False, cache_dir: str | None = None) -> None:
    """A Hub repo with a pickle adapter_model.bin and no adapter_model.safetensors is refused, as a local folder is
    (PEFT would read the pickle). Asked only when the safetensors file is not in the local cache, as PEFT's own
    download does. Where the Hub cannot be asked (offline, `local_files_only`), the cache answers: a cached pickle
    without a cached safetensors file is refused (PEFT would load it offline; before 2026-12-06 it did), in the
    `cache_dir` PEFT was given, or the default cache. Where
    neither can (not a repo id, nothing cached), PEFT's download reports what is wrong."""
    import huggingface_hub

    def path(name: str) -> str:
        return f"{subfolder}/{name}" if subfolder else name

    def exists(name: str) -> bool:
        return huggingface_hub.file_exists(repo_id, path(name), revision=revision, token=token)

    def cached(name: str) -> bool:
        return isinstance(huggingface_hub.try_to_load_from_cache(repo_id, path(name), cache_dir=cache_dir,
                                                                 revision=revision), str)

    try:
        if cached(SAFETENSORS_NAME):
            return
        pickle_cached = cached(PICKLE_NAME)
    except Exception:  # noqa: BLE001 — not a repo id: nothing to check here
        return
    from huggingface_hub import constants

    pickle_only = pickle_cached  # offline, or where the Hub does not answer: what PEFT would load from the cache
    if not (local_files_only or constants.HF_HUB_OFFLINE):
        try:
            pickle_only = not exists(SAFETENSORS_NAME) and exists(PICKLE_NAME)
        except Exception:  # noqa: BLE001 — the Hub does not answer
            pass
    if pickle_only:
        raise ValueError(
            f"the Hub repo {repo_id!r}{f' (subfolder {subfolder!r})' if subfolder else ''} holds only a pickle "
            f"{PICKLE_NAME}; peft-mole loads adapters from safetensors only. If you trust the file, download the "
            "folder and convert it once with `peft-mole convert-bin <folder>`"
        )


def _load_failure(error: Exception) -> str:
    """`torch.load`'s reason in one line: a refusal of `weights_only` explains itself over several lines, with advice
    to load the file unsafely first; its reason is what follows "WeightsUnpickler error:" (an unsupported global or
    operand), without torch's advice to allow it."""
    text, marker = str(error), "WeightsUnpickler error:"
    if marker not in text:  # (a blocked module: "Trying to load unsupported GLOBAL posix.system ...")
        lines = [line.strip() for line in text.splitlines() if line.strip()
                 and not line.startswith(("Weights only load failed", "Check the documentation"))]
        return lines[-1] if lines else ("the file ends early" if isinstance(error, EOFError) else "no reason given")
    reason = " ".join(text.split(marker, 1)[1].split("Check the documentation", 1)[0].split())
    return f"{marker} {reason.split(' Please use ', 1)[0]}"


def read_tensor_pickle(path: str) -> dict:
    """{name: tensor} of a pickle file, read with torch.load(weights_only=True) (tensors only, nothing executed);
    ValueError for a file that is empty, truncated, refused or not such a dict."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (an empty, truncated or refused pickle)
        raise ValueError(f"{path} cannot be read as tensors ({type(error).__name__}: {_load_failure(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path} is not a flat dict of named tensors, so it is not an adapter state dict")
    return state


def convert_bin_adapter(folder: str, overwrite: bool = False) -> str:
    """Opt-in: write adapter_model.safetensors from a pickle adapter_model.bin (tensors only). Returns its path.
    An existing adapter_model.safetensors (perhaps trained since) is replaced only with `overwrite`."""
    from safetensors.torch import save_file

    source = os.path.join(folder, PICKLE_NAME)
    if not os.path.isfile(source):
        raise ValueError(f"{source} does not exist")
    target = os.path.join(folder, SAFETENSORS_NAME)
    if os.path.exists(target) and not overwrite:
        raise ValueError(f"{target} exists already (it may hold newer weights than {PICKLE_NAME}): pass "
                         "overwrite=True (--overwrite) to replace it")
    state = read_tensor_pickle(source)
    partial = target + ".partial"  # written whole, then renamed over the target
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, partial, metadata={"format": "pt"})
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def text_config(model: nn.Module):
    """The model's config for its text part (`get_text_config()`: the config itself for a text-only model), or None."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def base_shape(model: nn.Module) -> dict | None:
    text = text_config(model)
    if text is None:
        return None
    shape = {key: getattr(text, key, None) for key in (*SHAPE_FIELDS, "vocab_size")}
    shape["model_type"] = getattr(text, "model_type", None)
    return shape


def check_base_shape(recorded: dict | None, model: nn.Module) -> None:
    """Compare the base recorded at training time with the one the adapter is loaded onto."""
    current = base_shape(model)
    if not recorded or current is None:
        return
    wrong = [
        f"{key} {recorded[key]} (this base: {current[key]})"
        for key in SHAPE_FIELDS
        if recorded.get(key) is not None and current.get(key) is not None and recorded[key] != current[key]
    ]
    if wrong:
        raise ValueError(
            "this adapter was trained on a base with " + ", ".join(wrong)
            + "; load it onto the base it was trained for (its base_model_name_or_path)"
        )
    if recorded.get("model_type") and current.get("model_type") and recorded["model_type"] != current["model_type"]:
        warnings.warn(
            f"the adapter was trained on a {recorded['model_type']!r} base, this base is {current['model_type']!r}: "
            "the sizes agree, but the layers may compute otherwise (e.g. another MLP activation)",
            stacklevel=3,
        )
    if recorded.get("vocab_size") and current.get("vocab_size") and recorded["vocab_size"] != current["vocab_size"]:
        warnings.warn(
            f"the adapter was trained on a base with vocab_size {recorded['vocab_size']}, this base has "
            f"{current['vocab_size']}: check that the tokenizer is the one it was trained with",
            stacklevel=3,
        )
