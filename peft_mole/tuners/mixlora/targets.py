"""Which modules of a decoder a routed-experts adapter wraps, found by structure rather than by model name."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_mole.tuners.expert_config import ExpertAdapterConfig
from peft_mole.tuners.mixlora.block_check import check_gated_forward

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass
class Target:
    kind: str  # "mlp" (whole block), "projection" (one routed gate/up/down) or "attention" (plain LoRA)
    layer_index: int | None  # decoder layer, from the first integer in the module path


def plain_linear(module) -> nn.Linear | None:
    """The nn.Linear of a module, looking through a PEFT tuner layer wrapper."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module if isinstance(module, nn.Linear) else None


def is_quantised(weight: torch.Tensor) -> bool:
    """A bitsandbytes weight: an integer dtype (int8; 4-bit packed into uint8), or 4-bit packed into a float storage
    dtype (`bnb_4bit_quant_storage=torch.bfloat16`, as QLoRA with FSDP loads a base), which only its `quant_state`
    tells apart from a float weight (before 2026-12-06, sixteenth session, such a base was taken as float: a shape
    error at the first forward, and DoRA experts were not refused); and a one-byte float weight (FP8, scaled by a
    separate `weight_scale_inv`: taken as float before 2026-12-08, its experts were made in float8)."""
    return not weight.dtype.is_floating_point or hasattr(weight, "quant_state") or weight.dtype.itemsize == 1


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a layer makes its adapter tensors in: its frozen weight's, float32 where that is quantised."""
    return torch.float32 if is_quantised(weight) else weight.dtype


def find_gated_mlp(module: nn.Module) -> bool:
    """True for a gated MLP block: linear `gate_proj`, `up_proj`, `down_proj` and an `act_fn` (Llama family).

    Shapes must chain: gate/up map d -> i and down maps i -> d.
    """
    gate, up, down = (plain_linear(getattr(module, name, None)) for name in ("gate_proj", "up_proj", "down_proj"))
    if gate is None or up is None or down is None or not callable(getattr(module, "act_fn", None)):
        return False
    return (
        gate.in_features == up.in_features == down.out_features
        and gate.out_features == up.out_features == down.in_features
    )


def _check_plain_weights(name: str, mlp: nn.Module, use_dora: bool) -> None:
    """The MLP weights must live on a real device. Quantised (bitsandbytes) projections work — the expert path calls
    the modules, which dequantise inside — except with DoRA experts, which need the weights' row norms."""
    for proj in ("gate_proj", "up_proj", "down_proj"):
        weight = plain_linear(getattr(mlp, proj)).weight
        if weight.device.type == "meta":
            raise ValueError(f"{name}.{proj} has its weight on the meta device (offloaded); load the base on one device")
        if use_dora and is_quantised(weight):
            raise ValueError(
                f"{name}.{proj} has a quantised {weight.dtype} weight: DoRA experts need the float weights' row norms; "
                "use use_dora=False on a quantised base, or load the base in float32/bfloat16/float16"
            )


def _input_dtype(model: nn.Module, gate_weight: torch.Tensor) -> torch.dtype:
    """The dtype of an MLP block's input: its float weights', or for quantised weights the input embeddings'."""
    if not is_quantised(gate_weight):
        return gate_weight.dtype
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point else torch.float32


def _is_routed(module: nn.Module) -> bool:
    """True when a projection (or a wrapper inside it) carries a router: routed experts of router_scope='projection'."""
    while isinstance(module, BaseTunerLayer):
        if any(name.endswith("router") for name in module.adapter_layer_names):
            return True
        module = module.base_layer
    return False


def layer_index(name: str, decoder: str = "") -> int | None:
    """The decoder layer of module `name`: the first integer of its path after the decoder's own (`decoder_path`)."""
    match = _LAYER_INDEX.search(name[len(decoder) + 1:] if decoder else name)
    return int(match.group(1)) if match else None


def decoder_path(model: nn.Module) -> str:
    """Where the decoder (the language model) sits in `model`: "model" in a `LlamaForCausalLM`,
    "model.language_model" in a vision-language model; "" (the whole model) where `get_decoder` finds none. The
    targets are searched there only: before 2026-12-08 a vision tower's MLP blocks and q/k/v projections were
    adapted too, numbered as decoder layers (found by a review)."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    if not isinstance(decoder, nn.Module) or decoder is model:
        return ""
    return next((name for name, module in model.named_modules() if module is decoder), "")


def _layer_path(name: str) -> str | None:
    """The decoder layer a module belongs to, as a path: "model.layers.3" for "model.layers.3.mlp"."""
    match = _LAYER_INDEX.search(name)
    return name[: match.end(1)] if match else None


def _warn_partial_coverage(config: ExpertAdapterConfig, experts: list[str], attention: list[str]) -> None:
    """Warn when the adapter covers less than asked without failing: decoder layers (of the stack that holds the
    MLP blocks) whose MLP is not a gated block (a native Mixture-of-Experts layer: its routed experts get nothing),
    and `attn_target_modules` names that match no linear layer (multi-head latent attention has no q/k/v_proj).
    `experts`, `attention`: the targets kept (after `layers_to_transform`)."""
    mlp_layers = {_layer_path(name) for name in experts}
    stacks = {path.rsplit(".", 1)[0] for path in mlp_layers if path is not None}
    without_mlp = sorted({path for path in map(_layer_path, attention) if path is not None and path not in mlp_layers
                          and path.rsplit(".", 1)[0] in stacks}, key=lambda p: (len(p), p))
    if without_mlp:
        warnings.warn(
            f"{len(without_mlp)} decoder layer(s) have no gated MLP block (linear gate_proj, up_proj, down_proj and "
            f"act_fn), so no experts: {', '.join(without_mlp[:4])}{', ...' if len(without_mlp) > 4 else ''} (a native "
            "Mixture-of-Experts layer's routed experts are not adapted); they get attention LoRA only",
            stacklevel=3,
        )
    unmatched = [name for name in config.attn_target_modules if name not in {a.rsplit(".", 1)[-1] for a in attention}]
    if unmatched:
        warnings.warn(
            f"attn_target_modules {unmatched} match no linear layer outside the MLP blocks, so those projections get "
            "no attention LoRA (multi-head latent attention, for one, has no q_proj/k_proj/v_proj); "
            "attn_target_modules=[...] names the ones wanted",
            stacklevel=3,
        )


def find_targets(model: nn.Module, config: ExpertAdapterConfig, scope: str, block_cls: type) -> dict[str, Target]:
    """Module names to adapt: {name: Target}.

    MLP blocks are gated MLPs (`find_gated_mlp`) or blocks already wrapped by `block_cls` (a second adapter).
    scope "block" wraps each block; "projection" wraps its projections named in `expert_target_modules`.
    Attention targets are linear layers named in `attn_target_modules` outside the MLP blocks.
    `layers_to_transform` keeps modules of the listed decoder layers only.
    """
    decoder = decoder_path(model)
    inside = (lambda name: name.startswith(decoder + ".")) if decoder else (lambda name: True)
    blocks = {}
    for name, module in model.named_modules():
        if not inside(name):
            continue
        if isinstance(module, block_cls):
            blocks[name] = True
        elif find_gated_mlp(module) and not name.endswith(".base_layer"):
            blocks[name] = False
    if not blocks:
        fused = next((name for name, m in model.named_modules() if hasattr(m, "gate_up_proj")), None)
        if fused is not None and not isinstance(model.get_submodule(fused).gate_up_proj, nn.Module):
            raise ValueError(
                f"{fused} ({type(model.get_submodule(fused)).__name__}) holds routed experts as stacked parameters "
                "(a native Mixture-of-Experts layer) and the model has no dense gated MLP block (linear gate_proj, "
                "up_proj, down_proj and act_fn) for peft-mole's experts; a base with dense or shared-expert MLP "
                "blocks (Llama, Qwen2, Mistral, Qwen2-MoE's shared expert) is needed"
            )
        if fused is not None:
            raise ValueError(
                f"{fused} ({type(model.get_submodule(fused)).__name__}) fuses gate and up in one gate_up_proj "
                "(Phi-3 layout); peft-mole's MLP experts need separate gate_proj, up_proj and down_proj (Llama, "
                "Qwen2, Mistral, Gemma layouts). Supporting it means splitting gate_up_proj's output in the MLP "
                "block (see CONTRIBUTING.md, 'Adding a model family')"
            )
        raise ValueError(
            "peft-mole needs a decoder with gated MLP blocks (linear gate_proj, up_proj, down_proj and act_fn, as "
            f"in Llama, Qwen2, Mistral); none found in {type(model).__name__}"
        )
    if isinstance(config.num_experts, list):  # indexed by the decoder layer (`experts_in_layer`): one entry per
        # layer, those without a gated MLP (a native MoE layer beside dense ones) included (before 2026-12-08 the
        # list was counted against the gated blocks alone, so no list fitted such a model)
        from peft_mole.tuners.load_checks import text_config

        layers = getattr(text_config(model), "num_hidden_layers", None)
        expected = layers if isinstance(layers, int) and layers > 0 else len(blocks)
        if len(config.num_experts) != expected:
            raise ValueError(f"num_experts has {len(config.num_experts)} entries but the model has {expected} decoder "
                             "layers; give one entry per decoder layer (those without a gated MLP included)")
    targets: dict[str, Target] = {}
    for name, wrapped in blocks.items():
        block = model.get_submodule(name)
        _check_plain_weights(name, block.base_layer if wrapped else block, bool(getattr(config, 'use_dora', False)))
        routed_projections = not wrapped and any(
            _is_routed(getattr(block, p)) for p in ("gate_proj", "up_proj", "down_proj")
        )
        if (scope == "block" and routed_projections) or (scope == "projection" and wrapped):
            raise ValueError(
                f"{name} already carries adapters with another router_scope; one model holds adapters of one scope"
            )
        if scope == "block":
            targets[name] = Target("mlp", layer_index(name, decoder))
        else:
            for proj in config.expert_target_modules:
                targets[f"{name}.{proj}"] = Target("projection", layer_index(name, decoder))
    block_prefixes = tuple(name + "." for name in blocks)
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in config.attn_target_modules and plain_linear(module) is not None and not name.endswith(".base_layer"):
            if inside(name) and not name.startswith(block_prefixes):
                targets[name] = Target("attention", layer_index(name, decoder))
    if config.layers_to_transform is not None:
        layers = config.layers_to_transform
        wanted = {layers} if isinstance(layers, int) else set(layers)
        present = {t.layer_index for t in targets.values()}
        targets = {name: t for name, t in targets.items() if t.layer_index in wanted}
        if not targets:
            raise ValueError(f"layers_to_transform={layers} matches no decoder layer")
        if wanted - present:  # a typo would otherwise train fewer layers than asked, silently
            raise ValueError(f"layers_to_transform={layers}: layers {sorted(wanted - present)} hold no target "
                             f"module; the targets are in layers {sorted(present)}")
    for name, target in targets.items():  # the blocks this adapter wraps (after `layers_to_transform`)
        if target.kind == "mlp" and not blocks[name]:
            block = model.get_submodule(name)
            gate = plain_linear(block.gate_proj)  # (in_features: a 4-bit weight is stored packed, (N·K/2, 1))
            check_gated_forward(name, block, gate.in_features, gate.weight.device, _input_dtype(model, gate.weight))
    _warn_partial_coverage(config, [name for name, t in targets.items() if t.kind != "attention"],
                           [name for name, t in targets.items() if t.kind == "attention"])
    return targets
