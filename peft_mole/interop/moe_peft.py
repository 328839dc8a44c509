"""Convert MixLoRA adapters between MoE-PEFT's format and peft-mole's PEFT format (format notes:
bench/peers/MOE_PEFT_FORMAT.md).

MoE-PEFT (and the `mixlora` package) save `adapter_config.json` with `"peft_type": "MIXLORA"` and a pickle
`adapter_model.bin` of tensors named

    mixlora.layers.{L}.mlp.moe_gate.weight                         (E, hidden)   router
    mixlora.layers.{L}.mlp.{gate,up,down}_proj.experts.{e}.lora_A.weight   (r, in)
    mixlora.layers.{L}.mlp.{gate,up,down}_proj.experts.{e}.lora_B.weight   (out, r)
    mixlora.layers.{L}.self_attn.{q,k,v,o}_proj.lora_A.weight / lora_B.weight  attention LoRA

Their top-k forward (softmax in fp32, top-k, weights renormalised to 1, expert LoRA on the frozen gate/up/down,
s = alpha/r) is MixLoRA's formula, the one peft-mole computes; the frozen down projection runs once per expert
there and once on the weighted sum here, equal since the weights sum to 1. Only routing_strategy "mixlora"
(top-k) maps to MixLoRAConfig. Reading the pickle uses `torch.load(weights_only=True)` (tensors only).

The two readers of this format differ in one point, hence `flavour`: MoE-PEFT ("moe-peft") gives the expert LoRAs
the settings of an `expert_lora` section when there is one; the `mixlora` package ("mixlora") ignores that section
and uses the top-level r / lora_alpha / use_rslora for experts too, and it needs `act_fn` written in the config.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings

import torch
from safetensors.torch import load_file, save_file
from transformers.activations import ACT2FN

from peft_mole.multijob.checkpoint import write_atomically
from peft_mole.tuners.expert_config import ATTENTION_PROJECTIONS, EXPERT_PROJECTIONS
from peft_mole.tuners.load_checks import read_tensor_pickle
from peft_mole.tuners.mixlora.config import MixLoRAConfig

_ROUTER = re.compile(r"^mixlora\.layers\.(\d+)\.mlp\.moe_gate\.weight$")
_EXPERT = re.compile(r"^mixlora\.layers\.(\d+)\.mlp\.(\w+)\.experts\.(\d+)\.lora_([AB])\.weight$")
_ATTENTION = re.compile(r"^mixlora\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight$")
_PREFIX = "base_model.model.model.layers"
FLAVOURS = ("moe-peft", "mixlora")


def _check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")


def _check_target(source: str, target: str, overwrite: bool) -> None:
    """Refuse to write over the source, over a file, or (unless `overwrite`) into a folder that holds files."""
    if os.path.isdir(source) and os.path.realpath(source) == os.path.realpath(target):
        raise ValueError(f"the output folder {target} is the input folder: give another folder")
    inside = [path for path in (source, os.getcwd())
              if os.path.commonpath([os.path.realpath(path), os.path.realpath(target)]) == os.path.realpath(target)]
    if inside and os.path.exists(target):  # replacing it whole would delete what lies inside
        raise ValueError(f"the output folder {target} holds {inside[0]}: give a folder of its own")
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"the output {target} exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(target))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):  # (was "[Errno 17] File exists")
        raise ValueError(f"the output {target} lies under {parent}, which is a file")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise ValueError(f"the output folder {target} is not empty: give a new folder, or replace it with "
                         "overwrite=True (--overwrite)")


def _check_reference_values(where: str, config: dict) -> None:
    """The values a MoE-PEFT MixLoRA config holds, of their kinds, named (before 2026-12-06, eighteenth session,
    `null`, a string or a list in their place failed with a TypeError or AttributeError traceback, and
    `use_rslora: "false"` read as true)."""
    section = config.get("expert_lora")
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"{where}: expert_lora must be a mapping of the experts' LoRA settings, got {section!r}")
    numbers = ("lora_alpha", "lora_dropout", "router_aux_loss_coef", "router_init_range", "jitter_noise")
    for scope, values in (("", config), ("expert_lora.", section or {})):
        for key, value in values.items():
            if key in ("r", "num_experts", "top_k") and (isinstance(value, bool) or not isinstance(value, int)
                                                         or value < 1):
                raise ValueError(f"{where}: {scope}{key} must be an int >= 1, got {value!r}")
            if key in numbers and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{where}: {scope}{key} must be a number, got {value!r}")
            if key in ("use_rslora", "router_loss") and not isinstance(value, bool):
                raise ValueError(f"{where}: {scope}{key} must be true or false, got {value!r}")


def _read_reference(folder: str) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{config_path} does not exist: not an adapter folder")
    with open(config_path) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    missing = [key for key in ("r", "lora_alpha", "num_experts", "top_k") if key not in config]
    if config.get("peft_type") == "MIXLORA" and missing:
        raise ValueError(f"{config_path} lacks {missing}, which a MoE-PEFT MixLoRA adapter_config.json holds")
    if config.get("peft_type") == "MIXLORA":
        _check_reference_values(config_path, config)
    if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        return config, load_file(os.path.join(folder, "adapter_model.safetensors"))
    weights = os.path.join(folder, "adapter_model.bin")
    if not os.path.isfile(weights):
        raise ValueError(f"{folder} holds neither adapter_model.safetensors nor adapter_model.bin")
    state = read_tensor_pickle(weights)
    return config, {k: v.detach().float().contiguous().clone() for k, v in state.items()}  # (no shared storage)


def _check_complete(source: str, config: MixLoRAConfig, routers: dict, experts: dict, attention: dict) -> None:
    """Every layer from 0 to the last has tensors, a router of `num_experts` rows, every targeted projection's
    factors (all experts) of the adapter's ranks and of one width per projection across layers (the router's
    width, the hidden size, where a factor meets the hidden states), and no projection outside the targets: else
    the converted adapter would compute otherwise, or fail only when loaded."""
    layers = set(routers) | {key[0] for key in experts} | {key[0] for key in attention}
    if not layers:
        raise ValueError(f"{source}: the adapter holds no MixLoRA tensors")
    gaps = sorted(set(range(max(layers) + 1)) - layers)
    if gaps:
        raise ValueError(f"{source}: layers {gaps} have no tensors, while layer {max(layers)} has: the converted "
                         "adapter targets every layer")
    _check_widths(source, config, routers, experts, attention)
    for layer in sorted(layers):
        if layer not in routers:
            raise ValueError(f"{source}: layer {layer} has no router (moe_gate)")
        wanted = [(proj, f) for proj in config.expert_target_modules for f in "AB"]
        missing = [f"{proj}.lora_{f}" for proj, f in wanted if (layer, proj, f) not in experts]
        missing += [f"self_attn.{proj}.lora_{f}" for proj in config.attn_target_modules for f in "AB"
                    if (layer, proj, f) not in attention]
        if missing:
            raise ValueError(f"{source}: layer {layer} lacks {missing}")
    extra = sorted({proj for _, proj, _ in experts} - set(config.expert_target_modules))
    extra += sorted({proj for _, proj, _ in attention} - set(config.attn_target_modules))
    if extra:
        raise ValueError(f"{source}: tensors for {extra}, which target_modules does not name")
    for (layer, proj, factor), tensor in [*experts.items(), *attention.items()]:
        r = config.r if (layer, proj, factor) in experts else config.attention_lora[0]
        if tensor.shape[-2 if factor == "A" else -1] != r:
            raise ValueError(f"{source}: layer {layer} {proj} lora_{factor} has shape {tuple(tensor.shape)}, not "
                             f"rank {r} as its config says")


def _check_widths(source: str, config: MixLoRAConfig, routers: dict, experts: dict, attention: dict) -> None:
    hidden = {tuple(router.shape) for router in routers.values()}
    if len(hidden) != 1 or next(iter(hidden))[0] != config.num_experts:
        raise ValueError(f"{source}: the routers (moe_gate) have shapes {sorted(hidden)}; each must be "
                         f"(num_experts={config.num_experts}, hidden size), the same in every layer")
    width = next(iter(hidden))[1]
    shapes: dict[tuple[str, str], set] = {}
    for (_, proj, factor), tensor in [*experts.items(), *attention.items()]:
        shapes.setdefault((proj, factor), set()).add(tuple(tensor.shape))
    # where a factor reads or writes the hidden states: A's input of gate/up/q/k/v, B's output of down/o
    meets_hidden = {("gate_proj", "A"): 1, ("up_proj", "A"): 1, ("q_proj", "A"): 1, ("k_proj", "A"): 1,
                    ("v_proj", "A"): 1, ("down_proj", "B"): 0, ("o_proj", "B"): 0}
    for (proj, factor), seen in sorted(shapes.items()):
        dim = meets_hidden.get((proj, factor))
        if len(seen) != 1 or (dim is not None and next(iter(seen))[dim] != width):
            raise ValueError(f"{source}: {proj} lora_{factor} has shapes {sorted(seen)} across layers; it must have "
                             "one shape" + ("" if dim is None else f" with the hidden size {width} (the routers')"))


def config_from_moe_peft(reference: dict, flavour: str = "moe-peft") -> MixLoRAConfig:
    """MixLoRAConfig of a MoE-PEFT / `mixlora` package MixLoRA adapter_config.json.

    Expert LoRA settings come from `expert_lora` when given and `flavour` is "moe-peft"; the `mixlora` package
    ("mixlora") ignores that section, so the converted adapter computes what the package computes (with a warning).
    """
    _check_flavour(flavour)
    if reference.get("peft_type") != "MIXLORA":
        raise ValueError(f"peft_type must be 'MIXLORA' for a MoE-PEFT MixLoRA adapter, got {reference.get('peft_type')!r}")
    strategy = reference.get("routing_strategy")
    if strategy != "mixlora":
        raise ValueError(
            f"routing_strategy {strategy!r} is not supported: only 'mixlora' (top-k) maps to MixLoRAConfig "
            "('mixlora-dynamic' is top-p with a temperature, 'mixlora-switch' the Switch router)"
        )
    targets = list(reference.get("target_modules") or [])
    section = reference.get("expert_lora") or {}
    if reference.get("use_dora") or (flavour == "moe-peft" and section.get("use_dora")):
        raise ValueError("MoE-PEFT DoRA adapters are not supported by the converter yet (use_dora=true)")
    if flavour == "mixlora" and section.get("r", reference["r"]) != reference["r"]:
        raise ValueError(f"expert_lora r={section['r']} differs from r={reference['r']}: the mixlora package builds "
                         "expert LoRAs with the top-level r and cannot load this adapter; convert it with flavour "
                         "'moe-peft' (MoE-PEFT reads `expert_lora`)")
    top_level = {"lora_alpha": reference["lora_alpha"], "lora_dropout": reference.get("lora_dropout", 0.0),
                 "use_rslora": reference.get("use_rslora", False)}
    ignored = sorted(key for key, value in top_level.items() if key in section and section[key] != value)
    if flavour == "mixlora" and ignored:  # (before 2026-12-06, eighteenth session, lora_alpha alone was named)
        warnings.warn(f"the mixlora package ignores `expert_lora` and builds the experts with the top-level {ignored} "
                      f"({', '.join(f'{k}={top_level[k]!r}, not {section[k]!r}' for k in ignored)}); converting as "
                      "the package computes (use flavour 'moe-peft' for MoE-PEFT's reading)", stacklevel=2)
    if flavour == "mixlora" and reference.get("jitter_noise", 0.0) > 0:
        warnings.warn(f"jitter_noise={reference['jitter_noise']}: the `mixlora` package jitters the MoE input in "
                      "every forward, inference too, so its outputs are random; peft-mole jitters the router input "
                      "in training only", stacklevel=2)
    experts = {**reference, **(section if flavour == "moe-peft" else {})}
    expert_rslora, attn_rslora = bool(experts.get("use_rslora", False)), bool(reference.get("use_rslora", False))
    # one use_rslora in MixLoRAConfig: where the attention LoRA's differs from the experts', its scale (alpha/r, or
    # alpha/sqrt(r) with rsLoRA) is kept by its lora_alpha, read under the experts' rule
    attn_alpha = reference["lora_alpha"]
    if attn_rslora != expert_rslora:
        root = math.sqrt(int(reference["r"]))
        attn_alpha = attn_alpha * root if attn_rslora else attn_alpha / root
    return MixLoRAConfig(
        num_experts=int(reference["num_experts"]), top_k=int(reference["top_k"]),
        r=int(experts["r"]), lora_alpha=experts["lora_alpha"], lora_dropout=float(experts.get("lora_dropout", 0.0)),
        use_rslora=expert_rslora,
        expert_target_modules=[p for p in EXPERT_PROJECTIONS if p in targets],
        attn_target_modules=[p for p in ATTENTION_PROJECTIONS if p in targets],
        attn_r=int(reference["r"]), attn_lora_alpha=attn_alpha,
        attn_lora_dropout=float(reference.get("lora_dropout", 0.0)),
        # MoE-PEFT's load-balance loss is Mixtral's, top_k times ours (its f sums to k): the same weight is k × its
        # coefficient here (its default 0.001)
        # `router_loss: false` (MoE-PEFT adds no load-balance loss then; before 2026-12-08 the coefficient was kept)
        router_aux_loss_coef=float(reference.get("router_aux_loss_coef", 0.001)) * int(reference["top_k"])
        if reference.get("router_loss", True) else 0.0,
        router_init_std=float(reference.get("router_init_range", 0.02)),
        jitter_noise=float(reference.get("jitter_noise", 0.0)),
        base_model_name_or_path=reference.get("base_model_name_or_path"),
    )


def import_moe_peft(source: str, target: str, flavour: str = "moe-peft", overwrite: bool = False) -> MixLoRAConfig:
    """Write a peft-mole MixLoRA adapter (PEFT format, safetensors) converted from a MoE-PEFT / `mixlora` package
    adapter folder `source` (`flavour` "moe-peft" or "mixlora", see the module docstring) to the folder `target`,
    atomically (a new folder, or with `overwrite` one that replaces `target` whole)."""
    _check_flavour(flavour)
    _check_target(source, target, overwrite)
    reference, tensors = _read_reference(source)
    config = config_from_moe_peft(reference, flavour)
    experts: dict[tuple[int, str, str], dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    routers, attention = {}, {}
    for name, tensor in tensors.items():
        if match := _ROUTER.match(name):
            out[f"{_PREFIX}.{match[1]}.mlp.mixlora_router.weight"] = tensor
            routers[int(match[1])] = tensor
        elif match := _EXPERT.match(name):
            experts.setdefault((int(match[1]), match[2], match[4]), {})[int(match[3])] = tensor
        elif match := _ATTENTION.match(name):
            out[f"{_PREFIX}.{match[1]}.self_attn.{match[2]}.mixlora_{match[3]}"] = tensor
            attention[int(match[1]), match[2], match[3]] = tensor
        else:
            raise ValueError(f"{source}: unexpected tensor {name!r} for a MoE-PEFT MixLoRA adapter")
    for (layer, proj, factor), per_expert in experts.items():
        if sorted(per_expert) != list(range(config.num_experts)):
            raise ValueError(f"{source}: layer {layer} {proj} has experts {sorted(per_expert)}, "
                             f"expected 0..{config.num_experts - 1}")
        shapes = sorted({tuple(tensor.shape) for tensor in per_expert.values()})
        if len(shapes) != 1:
            raise ValueError(f"{source}: layer {layer} {proj} lora_{factor} has shapes {shapes} across its experts; "
                             "they must have one")
        stacked = torch.stack([per_expert[e] for e in range(config.num_experts)])
        out[f"{_PREFIX}.{layer}.mlp.mixlora_experts.{proj}_lora_{factor}"] = stacked.contiguous()
    _check_complete(source, config, routers, {key: next(iter(v.values())) for key, v in experts.items()}, attention)
    _check_activation(source, reference, config)

    def write(folder: str) -> None:
        config.save_pretrained(folder)
        save_file(out, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})

    write_atomically(target, write)
    return config


_SAME_ACTIVATION = {"swish": "silu"}


def _check_activation(source: str, reference: dict, config: MixLoRAConfig) -> None:
    """MoE-PEFT and the `mixlora` package compute the experts with the config's `act_fn`; peft-mole with the base
    MLP's own activation. Warn where the two differ, or where the base's cannot be read here to compare and act_fn
    is not SiLU, the activation of the MLPs MixLoRA targets."""
    act_fn = reference.get("act_fn")
    if not act_fn:
        return
    base = _base_activation(config)
    if base is None and _SAME_ACTIVATION.get(act_fn, act_fn) != "silu":  # (silu: Llama, Qwen2, Mistral MLPs)
        warnings.warn(f"{source}: act_fn {act_fn!r}; the converted experts use the base MLP's own activation, which "
                      f"cannot be read here ({config.base_model_name_or_path!r}): check that it is {act_fn!r}",
                      stacklevel=3)
    elif base is not None and _SAME_ACTIVATION.get(act_fn, act_fn) != _SAME_ACTIVATION.get(base, base):
        warnings.warn(f"{source}: act_fn {act_fn!r} differs from the base model's activation {base!r}, which the "
                      "converted experts use: the converted adapter computes otherwise than the reference",
                      stacklevel=3)


def _base_activation(config: MixLoRAConfig) -> str | None:
    """The activation named in the base model's config.json when that file is on this machine (a folder or the
    Hugging Face cache): `hidden_activation` (Gemma 2/3 MLPs) or `hidden_act`. Only the JSON is read."""
    from huggingface_hub import try_to_load_from_cache

    base = config.base_model_name_or_path
    if not base:
        return None
    path = os.path.join(base, "config.json") if os.path.isdir(base) else None
    if path is None:
        try:
            path = try_to_load_from_cache(base, "config.json")
        except ValueError:  # not a repo id
            return None
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            fields = json.load(f)
    except (OSError, ValueError):
        return None
    return fields.get("hidden_activation") or fields.get("hidden_act")


def export_moe_peft(source: str, target: str, flavour: str = "moe-peft", act_fn: str | None = None,
                    overwrite: bool = False) -> None:
    """Write a MixLoRA adapter in the MoE-PEFT format (adapter_config.json + pickle adapter_model.bin, the files
    MoE-PEFT and the `mixlora` package load) from a peft-mole MixLoRA adapter folder.

    `act_fn` (e.g. "silu") is written to the config; by default it is the activation in the base model's
    config.json, read from `base_model_name_or_path` when that file is on this machine. The `mixlora` package needs it, and it gives
    the experts the attention LoRA's r/lora_alpha, so flavour "mixlora" refuses adapters where the two differ.
    """
    _check_flavour(flavour)
    _check_target(source, target, overwrite)
    config = _mixlora_config(source)
    weights = os.path.join(source, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise ValueError(f"{weights} does not exist (a peft-mole adapter folder holds its weights in safetensors)")
    tensors = load_file(weights)
    if isinstance(config.num_experts, list) or config.use_dora:
        raise ValueError("MoE-PEFT has one expert count for every layer and no DoRA experts in this format")
    if config.layers_to_transform is not None:
        raise ValueError("MoE-PEFT's format adapts every decoder layer: an adapter with layers_to_transform "
                         f"({config.layers_to_transform}) cannot be exported")
    experts = {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout}
    if config.attn_target_modules:  # top level = attention LoRA; experts that differ go to `expert_lora`
        r, alpha, dropout = config.attention_lora
        top = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout}
        expert_lora = experts if top != experts else None
        if flavour == "mixlora" and expert_lora and (top["r"], top["lora_alpha"]) == (config.r, config.lora_alpha):
            expert_lora = None  # only dropout differs: the package ignores `expert_lora`, and dropout is for training
            warnings.warn("the mixlora package reads one lora_dropout for experts and attention: the attention's is "
                          f"written ({top['lora_dropout']}; the experts trained with {config.lora_dropout})",
                          stacklevel=2)
    else:  # experts only: their settings are the top level
        top, expert_lora = experts, None
    if flavour == "mixlora" and expert_lora:
        raise ValueError(
            f"the mixlora package gives expert LoRAs the attention LoRA's r/lora_alpha; this adapter has experts "
            f"r={config.r}, lora_alpha={config.lora_alpha} and attention r={top['r']}, "
            f"lora_alpha={top['lora_alpha']}: export with flavour 'moe-peft' (MoE-PEFT reads `expert_lora`)"
        )
    act_fn = act_fn or _base_activation(config)
    if flavour == "mixlora" and config.jitter_noise > 0:
        warnings.warn(f"jitter_noise={config.jitter_noise} is written as 0 for the `mixlora` package, which would "
                      "jitter the MoE input of every forward (inference too)", stacklevel=2)
    if flavour == "mixlora" and not act_fn:
        raise ValueError(f"act_fn is required for the mixlora package and the base model "
                         f"{config.base_model_name_or_path!r} is not available offline: pass act_fn (e.g. 'silu')")
    if act_fn is not None and act_fn not in ACT2FN:
        raise ValueError(f"act_fn must be a transformers activation name (e.g. 'silu', 'gelu_pytorch_tanh'), "
                         f"got {act_fn!r}")
    out = {}
    pattern = re.compile(rf"^{re.escape(_PREFIX)}\.(\d+)\.(mlp|self_attn)\.(.+)$")
    for name, tensor in tensors.items():
        match = pattern.match(name)
        if match is None:
            raise ValueError(f"{source}: unexpected tensor {name!r}")
        layer, block, rest = match.groups()
        if rest == "mixlora_router.weight":
            out[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = tensor
        elif m := re.match(r"^mixlora_experts\.(\w+)_lora_([AB])$", rest):
            for e in range(tensor.shape[0]):
                out[f"mixlora.layers.{layer}.mlp.{m[1]}.experts.{e}.lora_{m[2]}.weight"] = tensor[e].clone()
        elif m := re.match(r"^(\w+)\.mixlora_([AB])$", rest):
            out[f"mixlora.layers.{layer}.self_attn.{m[1]}.lora_{m[2]}.weight"] = tensor
        else:
            raise ValueError(f"{source}: tensor {name!r} has no MoE-PEFT counterpart")
    reference = {
        "bias": "none", "peft_type": "MIXLORA", "r": top["r"], "lora_alpha": _int_alpha(top["lora_alpha"], ""),
        "lora_dropout": max(top["lora_dropout"], 1e-3),  # MoE-PEFT and the package require > 0
        "target_modules": list(config.attn_target_modules) + list(config.expert_target_modules),
        "routing_strategy": "mixlora", "num_experts": config.num_experts, "top_k": config.top_k,
        **({"act_fn": act_fn} if act_fn else {}),
        "router_aux_loss_coef": config.router_aux_loss_coef / config.top_k,  # (Mixtral's loss there: k × ours)
        "router_init_range": float(config.router_init_std),  # (MoE-PEFT asserts floats)
        # the package jitters in every forward, inference too (it is inference-only): 0 for it (2026-12-08)
        "jitter_noise": float(config.jitter_noise) if flavour == "moe-peft" else 0.0, "use_rslora": config.use_rslora,
        "base_model_name_or_path": config.base_model_name_or_path, "task_type": "CAUSAL_LM",
    }
    if expert_lora:  # (MoE-PEFT asserts lora_dropout > 0 here too)
        reference["expert_lora"] = {**expert_lora, "lora_alpha": _int_alpha(expert_lora["lora_alpha"], "expert_lora."),
                                    "lora_dropout": max(float(expert_lora["lora_dropout"]), 1e-3)}

    def write(folder: str) -> None:
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(reference, f, indent=4)
        torch.save(out, os.path.join(folder, "adapter_model.bin"))  # MoE-PEFT reads this file name

    write_atomically(target, write)


def _int_alpha(alpha, section: str) -> int:
    """`lora_alpha` as MoE-PEFT's config check requires it, an int (`isinstance(lora_alpha, int)`): a whole float
    is written as its int; another (an import whose attention and experts differ in `use_rslora` keeps its alpha as
    alpha · sqrt(r)) is refused, since the format cannot hold it (until 2026-12-07 it was written, and the reference
    refused the file)."""
    if isinstance(alpha, float) and alpha.is_integer():
        return int(alpha)
    if isinstance(alpha, int) and not isinstance(alpha, bool):
        return alpha
    raise ValueError(f"MoE-PEFT's format stores {section}lora_alpha as an int, and this adapter's is {alpha!r}; "
                     "it cannot be exported as it is (retrain or set a whole lora_alpha)")


def _mixlora_config(source: str) -> MixLoRAConfig:
    """The MixLoRAConfig of a peft-mole adapter folder; a clear error for a folder of another kind."""
    path = os.path.join(source, "adapter_config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: not an adapter folder")
    with open(path) as f:
        fields = json.load(f)
    if not isinstance(fields, dict):
        raise ValueError(f"{path} is not a JSON object")
    kind = fields.get("peft_type")
    if kind == "MIXLORA":
        raise ValueError(f"{source} is a MoE-PEFT adapter already: convert it with --from (import_moe_peft)")
    if kind != MixLoRAConfig.PEFT_TYPE:
        raise ValueError(f"{source} is a {kind} adapter: only MixLoRA adapters map to MoE-PEFT's format")
    return MixLoRAConfig.from_pretrained(source)
