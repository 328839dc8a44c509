"""MixLoRAModel: the PEFT tuner that finds gated MLPs and attention projections and swaps in MixLoRA layers."""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Collection
from contextlib import contextmanager
from functools import partial

import torch
from peft.tuners.lora.model import _adapter_names_pre_forward_hook
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers import GenerationConfig

from peft_mole.diagnostics import RouterStats, router_stats
from peft_mole.forward_context import (
    BASE_ROW,
    ForwardContext,
    RouterRecord,
    check_attention_mask,
    packed_real_tokens,
    real_tokens,
)
from peft_mole.routing import WholeLoad
from peft_mole.tuners.aux_outputs import declare_known, with_fields
from peft_mole.tuners.config_edits import edited, join_edit, leave_edit
from peft_mole.tuners.expert_config import SHAPE_RECORDED, ExpertAdapterConfig
from peft_mole.tuners.load_checks import base_shape, check_base_shape, check_every_tensor_given, text_config
from peft_mole.tuners.mixlora.attention import LoraLinear, factor_key_with_weight, factor_key_without_weight
from peft_mole.tuners.mixlora.layer import MixLoRAMLP
from peft_mole.tuners.mixlora.projection import MoELoraLinear
from peft_mole.tuners.mixlora.targets import find_targets


def router_aux_loss(
    records: list[RouterRecord], configs: dict[str, ExpertAdapterConfig],
    whole: dict[tuple[str, str], WholeLoad] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Aux loss of each adapter: the mean over its MoE layers of `config.layer_aux_loss` on non-padding tokens
    (MixLoRA: a · L_lb, SPEC.md §1; DynMoLE: entropy + load balance, §2). Returns (sum, per adapter). `whole`:
    {(adapter, layer): `WholeLoad`} of adapters whose tokens here are a piece of a micro-batch: their share of it."""
    per_layer: dict[str, list[torch.Tensor]] = {}
    for record in records:
        load = whole.get((record.adapter, record.layer)) if whole else None
        loss = configs[record.adapter].layer_aux_loss(*record.loss_inputs(), whole=load)
        per_layer.setdefault(record.adapter, []).append(loss)
    per_adapter = {name: torch.stack(losses).mean() for name, losses in per_layer.items()}
    return sum(per_adapter.values()), per_adapter


def _count_targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None) -> torch.Tensor | None:
    if shift_labels is not None:
        return (shift_labels != -100).sum()
    if labels is None:
        return None
    return (labels[..., 1:] != -100).sum()


def _generated_copies(args: tuple, kwargs: dict) -> int:
    """How many copies of each row `generate` makes, as transformers expands its inputs: max(num_beams,
    num_return_sequences), from the keywords or from the generation config, by keyword or by position
    (`generate(input_ids, generation_config)`, transformers' order); 1 for a forward call. The model's default
    generation config is not read: a forward call also comes through here."""
    positional = next((arg for arg in args if isinstance(arg, GenerationConfig)), None)
    config = kwargs.get("generation_config", positional)
    counts = [kwargs.get(key, getattr(config, key, None)) for key in ("num_beams", "num_return_sequences")]
    return max([1] + [int(count) for count in counts if count is not None])




class MixLoRAModel(BaseTuner):
    """Tuner for `MixLoRAConfig`: wraps gated MLP blocks in `MixLoRAMLP` and attention projections in `LoraLinear`.

    Its forward adds the router auxiliary loss to `outputs.loss` when labels are given (and exposes it as
    `outputs.aux_loss`), so `transformers.Trainer` trains it with no special trainer; TRL's `SFTTrainer` adds
    `outputs.aux_loss` as it does a Mixture-of-Experts model's (`_declare_router_aux_loss`).
    `adapter_names=[one name per row]` in forward/generate runs rows of different adapters in one pass.

    Example:
        >>> model = get_peft_model(base, MixLoRAConfig(num_experts=8, top_k=2))   # doctest: +SKIP
    """

    prefix = "mixlora_"
    mlp_layer_cls = MixLoRAMLP
    projection_layer_cls = MoELoraLinear
    attention_layer_cls = LoraLinear
    tuner_layer_cls = (LoraLinear, MixLoRAMLP, MoELoraLinear)
    target_module_mapping: dict[str, list[str]] = {}
    declares_router_aux_loss = True  # to TRL, in the base's config (`_declare_router_aux_loss`)
    packed_rows_may_end_in_padding = True  # a padding-free row's trailing pads do not count (`packed_real_tokens`)

    # ------------------------------------------------------------------ injection
    def _context(self) -> ForwardContext:
        context = self.__dict__.get("_forward_context")
        if context is None:
            context = ForwardContext()
            self.__dict__["_forward_context"] = context
        return context

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _prepare_model(self, peft_config: ExpertAdapterConfig, model: nn.Module) -> None:
        peft_config.validate()  # again: a field may have been changed since the config was made
        peft_config.__dict__["_tuner_ref"] = weakref.ref(self)  # router statistics for the model card
        if peft_config.base_model_shape and not peft_config.__dict__.get(SHAPE_RECORDED):
            check_base_shape(peft_config.base_model_shape, model)  # a loaded adapter: the base it was made for
        else:  # a new adapter, from a config made by the user or used for another base before
            peft_config.base_model_shape = base_shape(model)
            peft_config.__dict__[SHAPE_RECORDED] = True
        scope = getattr(peft_config, "router_scope", "block")
        self.__dict__["_targets"] = find_targets(model, peft_config, scope, self.mlp_layer_cls)
        if self.declares_router_aux_loss:
            self._declare_router_aux_loss(model)
            self._keep_aux_outputs_out_of_predictions(model)
        if "_base_call_hooks" not in self.__dict__:  # the base, and its decoder stack called alone (`get_decoder`)
            decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
            called = [model] + ([decoder] if isinstance(decoder, nn.Module) and decoder is not model else [])
            self.__dict__["_base_call_hooks"] = [module.register_forward_pre_hook(self._base_called, with_kwargs=True)
                                                 for module in called]
        declare_known()  # the output classes with aux loss fields, before any compiled forward (`aux_outputs`)

    def _declare_router_aux_loss(self, model: nn.Module) -> None:
        """Declare the router aux loss where TRL looks for a Mixture-of-Experts model's: the base's text config gets
        `output_router_logits` and `router_aux_loss_coef = 1.0` (`outputs.aux_loss` already holds the adapter
        config's coefficients). SFTTrainer then adds router_aux_loss_coef · `outputs.aux_loss` to the loss it
        computes from its fused LM head, for every `loss_type`, logs it as `aux_loss`, and
        `SFTConfig(router_aux_loss_coef=...)` scales it (0.0 turns it off). SFTTrainer also sets
        `output_router_logits = True`, which would make its fused head compute a native MoE base's load-balance loss
        from router logits a dense base has not: the forward sets it back to False (and takes the keyword TRL
        passes), and `router_aux_loss_coef` back to 1.0, which a trainer's coefficient replaced (TRL trainers read it
        once, at init: the next trainer's default is the adapter's weight again, not the last run's value; before
        2026-12-06, sixteenth session, it was). `unload()` removes both attributes; a config that has them already (a
        native MoE base) is left as it is, one that another model's tuner edited (a shared config) is shared
        (`tuners.config_edits`)."""
        text = text_config(model)
        if text is None or "_declared_aux_config" in self.__dict__:
            return
        shared = edited(text, "aux_loss")  # a config shared with another model, whose tuner declared it
        if hasattr(text, "output_router_logits") and not shared:  # a native MoE base's own: its coefficient as it
            # is now, before a trainer writes its own there (`_with_native_aux_loss`)
            self.__dict__.setdefault("_native_aux_coef", float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0))
            return
        if not shared:
            text.output_router_logits = False  # TRL sets it to whether it adds the aux loss
            text.router_aux_loss_coef = 1.0
        join_edit(text, "aux_loss")
        self.__dict__["_declared_aux_config"] = text

    def _keep_aux_outputs_out_of_predictions(self, model: nn.Module) -> None:
        """`Trainer.evaluate/predict` hand every output but the loss to `compute_metrics` as the predictions, less
        the config's `keys_to_ignore_at_inference`: the aux loss fields join them, so the predictions stay the
        logits, as with a PEFT LoRA model (before: a tuple of logits and aux losses)."""
        config = getattr(model, "config", None)
        if config is None or "_ignored_keys_config" in self.__dict__:
            return
        self.__dict__["_ignored_keys_config"] = config
        if edited(config, "ignored_keys"):  # (a config shared with another model: edited by its tuner)
            join_edit(config, "ignored_keys")
            return
        join_edit(config, "ignored_keys", undo=config.__dict__.get("keys_to_ignore_at_inference"))
        kept = list(getattr(config, "keys_to_ignore_at_inference", None) or ["cache"])  # (Trainer's default)
        config.keys_to_ignore_at_inference = kept + [k for k in ("aux_loss", "aux_loss_per_adapter") if k not in kept]

    def unload(self, *args, **kwargs):
        """The base model without the adapters, its config as it was (`_declare_router_aux_loss`,
        `_keep_aux_outputs_out_of_predictions`)."""
        config = self.__dict__.pop("_ignored_keys_config", None)  # (the last tuner on a shared config undoes it)
        last, before = leave_edit(config, "ignored_keys") if config is not None else (False, None)
        if last and before is None:
            config.__dict__.pop("keys_to_ignore_at_inference", None)
        elif last:
            config.keys_to_ignore_at_inference = before
        for hook in self.__dict__.pop("_base_call_hooks", ()):
            hook.remove()
        text = self.__dict__.pop("_declared_aux_config", None)
        if text is not None and leave_edit(text, "aux_loss")[0]:
            for name in ("output_router_logits", "router_aux_loss_coef"):
                text.__dict__.pop(name, None)
        return super().unload(*args, **kwargs)

    @staticmethod
    def _set_adapter_mode(layer: nn.Module, training: bool) -> None:
        """`layer` and its adapters' modules (dropout, experts, routers) in mode `training`, its wrapped module left
        as it is. Called once an adapter is added: a new layer takes the tuner's mode, so an adapter added to a model
        in eval mode (`add_adapter` after `eval()`) has its dropout, jitter and DoRA caching as in eval until
        `train()`; the first adapter's layers are in train mode as PEFT's (a fresh tuner's), whatever the base's."""
        for name, child in layer.named_children():
            if name != "base_layer":
                child.train(training)
        layer.training = training

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        return key in self.__dict__.get("_targets", {})

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection, with the attention LoRA's keys as saved since the first release (`...q_proj.mixlora_A`,
        the parameter being `...mixlora_A.<adapter>.weight`: `attention.LoraFactor`)."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return {factor_key_without_weight(k, cls.prefix, adapter_name): v for k, v in selected.items()}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """The inverse of `_get_adapter_state_dict` before PEFT's remapping (a file with `...mixlora_A.weight`, as
        a state dict of parameter names gives, loads too); weights that lack one of the adapter's tensors are refused
        (`check_every_tensor_given`)"""
        state_dict = {factor_key_with_weight(k, cls.prefix): v for k, v in state_dict.items()}
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_every_tensor_given(model, state_dict, cls.prefix, adapter_name)
        return state_dict

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's (half-precision adapter tensors to fp32), and without `autocast_adapter_dtype` each layer's tensors
        in the dtype it makes them: a `low_cpu_mem_usage=True` load assigns the file's tensors, whose dtype a normal
        load's copy would have set to those (a bf16 file on an fp16 base gave bf16 experts beside fp16 LoRA)."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            for module in self.model.modules():
                if hasattr(module, "cast_to_creation_dtype"):
                    module.cast_to_creation_dtype(adapter_name)

    def _create_and_replace(
        self, peft_config: ExpertAdapterConfig, adapter_name, target, target_name, parent, current_key, **kwargs
    ):
        spec = self.__dict__["_targets"][current_key]
        if spec.kind == "attention":
            layer_cls = self.attention_layer_cls
            layer = target if isinstance(target, layer_cls) else layer_cls(target, adapter_name, self._context())
            r, alpha, dropout = peft_config.attention_lora
            layer.update_layer(adapter_name, r=r, scaling=peft_config.scaling(r, alpha), dropout=dropout)
        else:
            layer_cls = self.mlp_layer_cls if spec.kind == "mlp" else self.projection_layer_cls
            layer = target if isinstance(target, layer_cls) else layer_cls(
                target, adapter_name, self._context(), current_key
            )
            layer.update_layer(
                adapter_name,
                projections=peft_config.expert_target_modules,
                num_experts=peft_config.experts_in_layer(spec.layer_index),
                r=peft_config.r,
                scaling=peft_config.scaling(peft_config.r, peft_config.lora_alpha),
                dropout=peft_config.lora_dropout,
                rule=peft_config.routing_rule(),
                router_init_std=peft_config.router_init_std,
                jitter_noise=peft_config.jitter_noise,
                use_dora=peft_config.use_dora,
                selection_varies=peft_config.SELECTION_VARIES,
            )
        self._set_adapter_mode(layer, self.training if layer is not target else layer.training)
        if layer is not target:
            setattr(parent, target_name, layer)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)

    # ------------------------------------------------------------------ forward
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Take `adapter_names` (one adapter name per batch row, or "__base__") for one forward/generate call."""
        names = kwargs.get("adapter_names")
        if names is not None:
            self._check_adapter_names(names)
            copies = _generated_copies(args, kwargs)
            names = [name for name in names for _ in range(copies)]  # generate expands each row into its copies
        context = self._context()
        context.set_row_adapters(names, by_hook=True)
        try:
            with self._modules_to_save_rows(names):
                yield
        finally:
            if context.rows_set_by_hook:
                # `generate` never reached the tuner's forward: nothing to recompute later, forget the rows
                context.set_row_adapters(None)

    @contextmanager
    def _modules_to_save_rows(self, names: list[str] | None):
        """Pass `adapter_names` to PEFT's `modules_to_save` copies (`AuxiliaryTrainingWrapper`) for the call, as
        PEFT's LoRA does, so that each row runs its own adapter's copy (the original module for "__base__", and for
        an adapter without a copy of that module, which runs it so alone; PEFT's LoRA raises a KeyError there)."""
        saves = names and any(getattr(config, "modules_to_save", None) for config in self.peft_config.values())
        wrappers = [m for m in self.model.modules() if isinstance(m, AuxiliaryTrainingWrapper)] if saves else []
        handles = []
        for wrapper in wrappers:
            copies = getattr(wrapper, "modules_to_save", None)  # (a ModulesToSaveWrapper's; other wrappers as PEFT)
            rows = names if copies is None else [name if name in copies else BASE_ROW for name in names]
            hook = partial(_adapter_names_pre_forward_hook, adapter_names=rows)  # PEFT's, as its LoRA registers it
            handles.append(wrapper.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        if adapter_name == BASE_ROW:
            raise ValueError(f"adapter name {BASE_ROW!r} is reserved: in adapter_names it stands for the base model "
                             "alone; choose another name")
        config = self.peft_config.get(adapter_name)
        if isinstance(config, ExpertAdapterConfig) and self._held_elsewhere(config, adapter_name):
            self.peft_config[adapter_name] = copy.deepcopy(config)
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _held_elsewhere(self, config: ExpertAdapterConfig, adapter_name: str) -> bool:
        """Whether `config` (the object given to `get_peft_model`/`add_adapter`) already belongs to another live
        model or to another adapter of this one. The config records the base it was made for and points to its
        model for the model card's router statistics, so an adapter made from a config already in use gets a copy
        of its own (PEFT's LoRA shares the object, whose fields it only fills with values that fit any base)."""
        if any(other is config for name, other in self.peft_config.items() if name != adapter_name):
            return True
        tuner_ref = config.__dict__.get("_tuner_ref")
        tuner = tuner_ref() if tuner_ref is not None else None
        return tuner is not None and tuner is not self and any(c is config for c in tuner.peft_config.values())

    def _base_called(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before each call of the base model or of its decoder stack that does not come through the tuner's forward
        (`generate` calls the base itself; so do `model.get_base_model()(...)` and `...get_decoder()(...)`).

        A call that does not come through `PeftModel` either runs the active adapter on every row, as PEFT's LoRA
        does, not the rows of the call before (kept for activation checkpointing's recomputation). Every such call
        counts the real tokens of its own 2-D `attention_mask` keyword (`dense_weights`), not the mask of the call
        before (a shape error where that was shorter); every token counts where the mask is positional or 4-D
        (generate with a static cache). Compiled with the base or the decoder (`torch.compile`, a compiled
        multi-job step), it is traced as part of the graph."""
        context = self._context()
        if context.in_tuner_call:
            return
        if not context.rows_set_by_hook and context.row_adapters is not None:
            context.set_row_adapters(None)
        check_attention_mask(args, kwargs)
        context.token_mask = real_tokens(kwargs.get("attention_mask"))

    def _check_adapter_names(self, names) -> None:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names must be a list of adapter names, one per row, got {names!r}")
        unknown = sorted({n for n in names if n not in self.peft_config and n != BASE_ROW})
        if unknown:
            raise ValueError(
                f"adapter_names has unknown adapter(s) {unknown}; known: {sorted(self.peft_config)} or '{BASE_ROW}'"
            )

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if getattr(self, "_is_replica", False):  # (one context, shared by the replicas' threads: rows, masks and
            # router records of one replica would be read by another)
            raise ValueError("peft-mole adapters do not run under torch.nn.DataParallel (Trainer uses it on several "
                             "GPUs without a distributed launch): launch one process per GPU instead, with "
                             "`accelerate launch` or `torchrun` (DistributedDataParallel)")
        context = self._context()
        direct = not context.rows_set_by_hook  # called directly, not through PeftModel
        if direct:
            if adapter_names is not None:
                self._check_adapter_names(adapter_names)
            context.set_row_adapters(adapter_names)
        context.rows_set_by_hook = False
        declared = self.__dict__.get("_declared_aux_config")
        if declared is not None:  # TRL's request for the aux loss it adds: answered here, not by the dense base
            kwargs.pop("output_router_logits", None)
            declared.output_router_logits = False
            # a trainer writes its coefficient here and keeps its own copy: back to the adapter's weight 1.0, or
            # the next trainer on this model would take the last one's as its default (0.0: no aux loss at all)
            declared.router_aux_loss_coef = 1.0
        self._rows_set(context, args, kwargs)
        labels = kwargs.get("labels")
        attention_mask = kwargs.get("attention_mask")
        check_attention_mask(args, kwargs)
        context.token_mask = real_tokens(attention_mask)
        context.records = [] if (self.training or labels is not None) else None
        positions = kwargs.get("position_ids")
        if (context.records is not None and attention_mask is None and self.packed_rows_may_end_in_padding
                and isinstance(positions, torch.Tensor) and positions.dim() == 2 and positions.shape[0] == 1):
            context.token_mask = packed_real_tokens(positions)  # padding-free with `pad_to_multiple_of`
        self._real_tokens_set(context)
        # return_dict=False: run with a dict and give its tuple back, the aux loss added as with a dict, as a native
        # MoE model's tuple holds it (before 2026-12-06, eighteenth session, the tuple's loss had no aux loss)
        as_tuple = context.records is not None and kwargs.get("return_dict") is False
        if as_tuple:
            kwargs["return_dict"] = True
        context.in_tuner_call = True
        try:
            with self._modules_to_save_rows(adapter_names if direct else None):
                outputs = self.model(*args, **kwargs)
            records = context.records
        finally:
            context.records, context.in_tuner_call = None, False
        if records:
            self._check_router_gradients(records)
            attached = self._attach_aux_loss(outputs, records, labels, kwargs.get("shift_labels"),
                                             kwargs.get("num_items_in_batch"))
            outputs = outputs if attached is None else attached  # (an override that sets items returns None)
        return outputs.to_tuple() if as_tuple and hasattr(outputs, "to_tuple") else outputs

    def _rows_set(self, context: ForwardContext, args: tuple, kwargs: dict) -> None:
        """Called by `forward` once the rows' adapters are known, before the base model runs (a hook for
        subclasses: `MultiJobModel` turns them into a tensor for its compiled steps)."""

    def _real_tokens_set(self, context: ForwardContext) -> None:
        """Called by `forward` once `context.token_mask` is set, before the base model runs (a hook for subclasses:
        `MultiJobModel` marks its sizes dynamic for its compiled steps)."""

    def _check_router_gradients(self, records: list[RouterRecord]) -> None:
        """Refuse to train routers whose probabilities lost their graph (reentrant activation checkpointing runs
        the layers under no_grad, so the aux loss would silently not reach the routers). Only the routers of the
        adapters whose records lost it count: a frozen adapter's rows (a reference adapter beside a trained one)
        have none to lose (before 2026-12-08 the first record alone was read, so such rows first were refused)."""
        if not (self.training and torch.is_grad_enabled()):
            return
        lost = {f"_router.{record.adapter}." for record in records if not record.probs.requires_grad}
        if lost and any(p.requires_grad for name, p in self.named_parameters() if any(key in name for key in lost)):
            raise ValueError(
                "the router auxiliary loss has no gradient: the decoder layers ran without autograd, as reentrant "
                "gradient checkpointing does. Use gradient_checkpointing_kwargs={'use_reentrant': False} "
                "(transformers' default) with peft-mole adapters."
            )

    def router_stats(self, adapters: Collection[str] | None = None) -> dict[tuple[str, str], RouterStats]:
        """Router statistics of the latest recorded forward pass of each adapter (of `adapters` only, when given:
        each costs host syncs): {(adapter, layer): RouterStats}. A trainer that also runs another adapter, as TRL's
        DPO runs its frozen "ref" copy after the policy, does not replace the trained adapter's statistics."""
        records = self.__dict__.get("_last_records", [])
        return {
            (r.adapter, r.layer): router_stats(*r.counted(), q=getattr(self.peft_config[r.adapter], "q", 1.0))
            for r in records  # (not an adapter deleted since)
            if r.adapter in self.peft_config and (adapters is None or r.adapter in adapters)
        }

    def _attach_aux_loss(self, outputs, records, labels, shift_labels, num_items_in_batch):
        """The outputs with the aux loss (`aux_loss`, `aux_loss_per_adapter`), and outputs.loss += aux · n/N, with n
        this micro-batch's target tokens and N = num_items_in_batch (else n).

        Under gradient accumulation the LM loss is Σ_micro Σ_token loss / N, so weighting each micro-batch's aux
        loss by n/N makes the accumulated aux term a token-weighted mean that sums to one aux loss. TRL's
        SFTTrainer computes its loss from `outputs.log_probs` (its fused LM head), which stay the model's
        log-probabilities, and adds `outputs.aux_loss` itself (`_declare_router_aux_loss`).
        """
        aux, per_adapter = router_aux_loss(records, self.peft_config)
        # kept detached for `router_stats()`, computed only when asked (it needs host syncs); per adapter, the
        # records of its latest forward
        ran = {r.adapter for r in records}
        self.__dict__["_last_records"] = [r for r in self.__dict__.get("_last_records", []) if r.adapter not in ran] + [
            dataclasses.replace(r, probs=r.probs.detach()) for r in records
        ]
        self.__dict__["last_aux_loss"] = {k: v.detach() for k, v in per_adapter.items()}
        if not hasattr(outputs, "keys"):
            return outputs  # a plain tuple (a model that gives no dict): no field to add the aux loss to
        # per adapter: {adapter: its aux loss over its own rows}, with grad; fields of the output's class, so that
        # DDP can rebuild it (`aux_outputs`)
        outputs = with_fields(outputs, aux_loss=self._with_native_aux_loss(outputs, aux),
                              aux_loss_per_adapter=per_adapter)
        label_mask = outputs.get("label_mask")
        n = label_mask.sum() if label_mask is not None else _count_targets(labels, shift_labels)
        if outputs.get("loss") is None or n is None:
            return outputs
        n = n.clamp(min=1).to(aux.dtype)
        denominator = n if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).to(n)
        outputs["loss"] = outputs["loss"] + aux * (n / denominator)
        return outputs

    def _with_native_aux_loss(self, outputs, aux: torch.Tensor) -> torch.Tensor:
        """`aux`, or on a native Mixture-of-Experts base whose forward returned its own router loss L_base (its config
        declares `router_aux_loss_coef` c > 0; `_declare_router_aux_loss` leaves it alone): L_base + aux / c, c the
        base's own coefficient as it was when the adapter was added, so that a TRL trainer's c' · aux_loss adds
        c' · L_base + (c'/c) · aux: the adapter's loss at weight 1 under the trainer's default (c' = c), 0 with
        c' = 0, scaled by any other value, in every trainer (before 2026-12-08 c was read at each forward, where
        SFTTrainer had written c': weight 1 whatever c', while DPO's c' scaled it by c'/c)."""
        native = outputs.get("aux_loss") if hasattr(outputs, "get") else None
        coef = self.__dict__.get("_native_aux_coef", 0.0)
        if native is None or "_declared_aux_config" in self.__dict__ or coef <= 0:
            return aux
        return native + aux / coef

    # ------------------------------------------------------------------ merging / unloading
    def _replace_module(self, parent, child_name, new_module, child) -> None:
        """Put `new_module` in place of `child` (layers are created on their base's device already)."""
        setattr(parent, child_name, new_module)

    def merge_and_unload(self, *args, **kwargs):
        raise ValueError(
            "MixLoRA and DynMoLE adapters cannot be merged: the MLP experts are chosen per token by the router, so "
            "no single weight update equals them. Use `unload()` for the base model, or keep the adapter (it loads "
            "with PeftModel.from_pretrained after `import peft_mole`)."
        )

    def merge_adapter(self, *args, **kwargs):
        self.merge_and_unload()

    def add_weighted_adapter(self, *args, **kwargs):
        raise ValueError(
            "add_weighted_adapter is not supported for MixLoRA and DynMoLE adapters: their experts and routers do not "
            "combine into one adapter. Use several adapters in one batch instead (adapter_names=[...] per row)."
        )

