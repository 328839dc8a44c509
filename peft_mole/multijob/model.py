"""One frozen base holding the adapters of many jobs of different kinds (LoRA, MixLoRA, DynMoLE) at once.

PEFT puts one adapter type in a `PeftModel`. Multi-job training needs LoRA, MixLoRA and DynMoLE jobs on the same
frozen weights in the same batch, so this tuner hosts them all with peft-mole's row-aware layers:

- a LoRA job gets `LoraLinear` on its target linears (y = W x + s·B A dropout(x), as PEFT's LoRA);
- a MixLoRA or DynMoLE job gets the routed-experts layers; its routing rule and aux loss come from its config.

Layers of different jobs nest (a LoRA wrapper inside a MixLoRA MLP block); every layer adds its delta to the rows of
its own adapters only. Each job is exported in its own method's PEFT format (`save_job`): a LoRA job loads with
plain `peft`, a MixLoRA/DynMoLE job with `PeftModel.from_pretrained` after `import peft_mole`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re

import torch
from peft import LoraConfig, PeftConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import set_seed

from peft_mole.forward_context import BASE_ROW, ForwardContext, PackedSegments
from peft_mole.model_card import update_model_card
from peft_mole.multijob.batching import row_ends
from peft_mole.multijob.dynamic_steps import mark_rows_and_length, step_config
from peft_mole.multijob.supported_jobs import check_job_name, check_lora_config
from peft_mole.ops.dropout import Dropout, register_stream, set_stream_widths
from peft_mole.ops.segmented_lora import constant_on
from peft_mole.ops.stream_checkpoint import replay_streams_in_checkpoints
from peft_mole.routing import WholeLoad, router_load
from peft_mole.tuners.aux_outputs import with_fields
from peft_mole.tuners.dynmole.config import DynMoLEConfig
from peft_mole.tuners.expert_config import ExpertAdapterConfig
from peft_mole.tuners.load_checks import adapter_of
from peft_mole.tuners.mixlora.attention import LoraLinear, factor_key_without_weight
from peft_mole.tuners.mixlora.model import MixLoRAModel, router_aux_loss
from peft_mole.tuners.mixlora.routed import RoutedExpertsLayer
from peft_mole.tuners.mixlora.targets import plain_linear

_INTERNAL_PREFIX = "mixlora_"


def enable_activation_checkpointing(model: nn.Module, args) -> None:
    """What `Trainer.train` does for `gradient_checkpointing=True` (TRL's default), which MultiJobTrainer's own loop
    must do itself: checkpoint the base's decoder layers with the arguments' kwargs (`every_n_layers`, `offload`,
    and torch's own, `use_reentrant=False` unless given)."""
    kwargs = dict(getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {})
    every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
    kwargs.setdefault("use_reentrant", False)  # reentrant checkpointing is refused (`trainer_args`)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers,
                                              offload=offload)
    else:  # transformers before activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Non-reentrant checkpointing needs no input that requires grad, so transformers' hook that makes the input
    # embeddings require it is dropped: in a compiled step its `requires_grad_()` on an intermediate breaks the graph
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    replay_streams_in_checkpoints(model)  # the jobs' masks, redrawn in the recomputation, equal the forward's


class MultiJobModel(MixLoRAModel):
    """A tuner whose adapters may be of different kinds: {job name: LoraConfig | MixLoRAConfig | DynMoLEConfig}.

    Every job is active at once; a forward takes `adapter_names` (one job per row, or one per token of a packed
    row: `ForwardContext.unit_view`). The forward records router statistics and returns
    `outputs.aux_loss_per_adapter` ({job: aux loss over its own rows}) without adding it to `outputs.loss`: each
    job's loss adds its own (MultiJobTrainer; `per_job_losses` the same, for a loop of one's own). On a float16 or
    bfloat16 base each job's adapter is float32, as `PeftModel`'s `autocast_adapter_dtype=True` makes a PEFT
    adapter (so its optimizer state is float32 too).

    Example:
        >>> model = MultiJobModel(base, {"a": LoraConfig(r=8), "b": MixLoRAConfig(num_experts=4)})  # doctest: +SKIP
        >>> out = model(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"])  # doctest: +SKIP
    """

    prefix = _INTERNAL_PREFIX
    declares_router_aux_loss = False  # each job's loss adds its own aux loss (MultiJobTrainer, `per_job_losses`)
    packed_rows_may_end_in_padding = False  # the trainer cuts each job's padding off before mixing (`strip_padding`)

    def __init__(self, model: nn.Module, configs: dict[str, PeftConfig], seeds: dict[str, int] | None = None) -> None:
        """`seeds` ({job: seed}, optional): `transformers.set_seed(seed)` before each job's adapter is made, so
        it starts as `SFTTrainer` (which seeds before `get_peft_model`) starts that job alone with its seed;
        without, the adapters draw from torch's generator as it is."""
        if not isinstance(configs, dict):
            raise TypeError(f"configs must be a dict {{job name: peft config}}, got {type(configs).__name__}")
        if not configs:
            raise ValueError("configs must hold at least one job: {name: peft config}")
        for name, config in configs.items():
            self._check_config(name, config)
        # LoRA jobs first: PEFT never looks inside an existing tuner layer, so a LoRA job must wrap gate/up/down
        # before a MixLoRA block wrapper hides them (the block then calls the LoRA-wrapped projections).
        order = sorted(configs, key=lambda name: not isinstance(configs[name], LoraConfig))
        first, *rest = order
        seeds = seeds or {}
        if first in seeds:
            set_seed(seeds[first])
        super().__init__(model, {first: configs[first]}, first)
        try:
            for name in rest:
                self.add_job(name, configs[name], seeds.get(name))
        except BaseException:  # the base as it was given (`trainer_args.check_no_adapter_layers`)
            self.unload()
            raise
        self.set_adapter(order)

    @staticmethod
    def _check_config(name: str, config: PeftConfig) -> None:
        check_job_name(name)
        if isinstance(config, LoraConfig):
            check_lora_config(name, config)
        elif isinstance(config, ExpertAdapterConfig) and config.modules_to_save:
            raise ValueError(f"job {name!r}: modules_to_save is not supported in multi-job training (a job trains "
                             f"its adapter only); got {config.modules_to_save!r}")
        elif not isinstance(config, ExpertAdapterConfig):
            raise TypeError(
                f"job {name!r}: peft_config must be a LoraConfig, MixLoRAConfig or DynMoLEConfig, got "
                f"{type(config).__name__}"
            )

    def add_job(self, name: str, config: PeftConfig, seed: int | None = None) -> None:
        """Inject one more job's adapter (all jobs stay active); `seed`: `transformers.set_seed(seed)` before."""
        self._check_config(name, config)
        if name in self.peft_config:
            raise ValueError(f"job name {name!r} is used twice; job names must be unique")
        if isinstance(config, LoraConfig) and any(not isinstance(c, LoraConfig) for c in self.peft_config.values()):
            raise ValueError(
                f"job {name!r}: add LoRA jobs before MixLoRA/DynMoLE jobs (or pass all jobs to MultiJobModel at once); "
                "the routed MLP wrappers hide the projections a later LoRA job would target"
            )
        self.peft_config[name] = config
        if seed is not None:
            set_seed(seed)
        try:
            self.inject_adapter(self.model, name)
        except BaseException:  # (before 2026-12-08 a failed injection left the name registered, its layers half made)
            try:
                self.delete_adapter(name)
            finally:
                self.peft_config.pop(name, None)
            raise
        self.set_adapter(list(self.peft_config))
        if self.__dict__.get("_compiled_steps"):  # a block the new job added: its flag as its layer's
            self._mark_checkpointed_blocks()

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """As the tuner's, then the job's adapter in float32 on a half-precision base, as `PeftModel` casts a PEFT
        adapter (`autocast_adapter_dtype=True`)."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._cast_adapter_dtype(adapter_name)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for module in self.model.modules():
            if isinstance(module, self.tuner_layer_cls):
                module.set_adapter(names)
        self.active_adapter = names

    # ------------------------------------------------------------------ compiled steps
    def _mark_checkpointed_blocks(self) -> int:
        """Each MixLoRA block's `layer_checkpointed`: whether its decoder layer is activation-checkpointed (what the
        per-row block then need not recompute itself). Read here, not per forward (a scan of every module), and per
        layer (`every_n_layers`); again by `add_job`, whose new blocks start with the class's False. Returns the
        number of decoder layers."""
        layers = [m for m in self.model.modules() if hasattr(m, "gradient_checkpointing")]  # decoder layers
        for layer in layers:
            for block in layer.modules():
                if hasattr(block, "layer_checkpointed"):
                    block.layer_checkpointed = bool(layer.gradient_checkpointing)
        return len(layers)

    def compile_mixed_steps(self, **compile_kwargs) -> None:
        """Compile the base model's decoder with its adapter layers (`nn.Module.compile`, keyword arguments as for
        `torch.compile`) so that one graph serves every mixed step, whatever jobs and rows it holds.

        Eager layers group the rows by job in Python, which a compiled graph would fix: each new composition of a
        step would compile again. Here each forward hands the layers one job index per row as a tensor, and they
        apply the jobs' stacked factors per row (`ops.indexed_lora`); the number of rows and the sequence length
        become dynamic after their first change (one recompile; a step of one row compiles once more, as Dynamo
        specialises sizes of 1), or are dynamic from the first graph with `dynamic=True` (`dynamic_steps`; the
        parameters keep static shapes; `dynamic=False` compiles every shape anew, as torch.compile). MixLoRA blocks
        route each row within its own job's part of one table of every job's routers and experts
        (`tuners.mixlora.per_row`). A block that holds DynMoLE jobs (a data-dependent
        number of experts per token) or DoRA experts runs eagerly inside the compiled step, its rows grouped by job
        as in an eager step (a graph break per such block; the rest of the layer stays compiled). A packed batch
        (one row, one adapter per token: TRL's padding-free steps) takes one job index per token, and its LoRA and
        expert A products run per job segment of the tokens (`ops.indexed_lora.packed_lora_delta`), whose ends the
        host knows from the names; the trainer concatenates the jobs' tokens in job order, so no layer permutes
        them."""
        compile_kwargs = {k: v for k, v in compile_kwargs.items() if k != "dynamic" or v is not None}  # None: unset
        if self.__dict__.get("_compiled_steps"):
            if self.__dict__["_compile_kwargs"] != compile_kwargs:
                raise ValueError(f"compile_mixed_steps was called with {self.__dict__['_compile_kwargs']} already; "
                                 f"cannot compile again with {compile_kwargs}")
            return
        self.__dict__["_compiled_steps"], self.__dict__["_compile_kwargs"] = True, dict(compile_kwargs)
        dynamic = compile_kwargs.get("dynamic")  # True: our marks (`dynamic_steps`), not torch.compile's
        self.dynamic_steps(dynamic is True)
        if dynamic:
            del compile_kwargs["dynamic"]
        layers = self._mark_checkpointed_blocks()
        # a block that runs eagerly (DynMoLE jobs, DoRA experts) breaks the graph: Dynamo resumes each decoder
        # layer's code in a frame of its own, one more compile per layer: past Dynamo's default limit of 8 from two
        # layers on (tests/multijob/test_compiled_eager_blocks.py), after which the later layers would run eagerly
        self.__dict__["_recompile_limit"] = 8 + 4 * layers
        # the decoder stack, where the adapters are: the LM head and the loss around it stay eager (TRL's fused
        # log-probs, `fused_lm_head=True` in MultiJobTrainer, multiply in tiles with `out=`, which breaks a graph,
        # and compiled, its tiles added three frames that each compiled once per shape change)
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        (decoder if isinstance(decoder, nn.Module) and decoder is not self.model else self.model).compile(**compile_kwargs)

    def dynamic_steps(self, dynamic: bool) -> None:
        """Set whether compiled steps mark the rows and the length (tokens, packed) dynamic from the first graph
        (`multijob.dynamic_steps`): it saves Dynamo's static first graph where steps vary (`small`, 4 LoRA / MixLoRA
        jobs: the first 6 steps 82 → 52 s / 122 → 73 s); else a static graph compiles sooner (42 s against 52 s)."""
        self.__dict__["_dynamic_steps"] = bool(dynamic)

    def forward(self, *args, **kwargs):
        if not self.__dict__.get("_compiled_steps"):
            return super().forward(*args, **kwargs)
        # Under activation checkpointing Dynamo would replay the context variable transformers' output capture sets
        # in each layer's forward in its recompute, which it cannot, so it would run those layers eagerly. LoRA jobs
        # have no forward side effect to replay (docs/performance.md, "torch.compile").
        patch = {"skip_fwd_side_effects_in_bwd_under_checkpoint": True}
        if self.__dict__.get("_dynamic_steps"):  # the inputs marked; eager blocks: every size dynamic
            patch.update(step_config(self, args, kwargs))
        if hasattr(torch._dynamo.config, "recompile_limit"):
            patch["recompile_limit"] = max(torch._dynamo.config.recompile_limit, self.__dict__.get("_recompile_limit", 8))
        with torch._dynamo.config.patch(**patch):
            return super().forward(*args, **kwargs)

    def _rows_set(self, context: ForwardContext, args: tuple, kwargs: dict) -> None:
        inputs = kwargs.get("input_ids", args[0] if args else None)
        inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
        self._set_stream_widths(context.row_adapters, kwargs.get("attention_mask"), inputs)
        if not self.__dict__.get("_compiled_steps"):
            return
        names, context.row_jobs, context.segments = context.row_adapters, None, None
        if names is None:
            return
        packed = inputs is not None and context.names_per_token(*inputs.shape[:2])
        if inputs is None or (len(names) != inputs.shape[0] and not packed):
            rows = "no input_ids or inputs_embeds" if inputs is None else f"{tuple(inputs.shape[:2])} tokens"
            raise ValueError(f"compiled multi-job steps take one adapter name per row, or per token of one packed "
                             f"row; got {len(names)} names for {rows}")
        context.jobs = tuple(self.peft_config)
        index = {job: i for i, job in enumerate(context.jobs)} | {BASE_ROW: len(context.jobs)}
        if not packed:  # a step's own tensor: marked dynamic (`_real_tokens_set`), or stamped by AOTAutograd with a
            # dynamic graph's sizes (`_dynamo_propagated_dynamic_indices`, on a saved input), a cached constant would
            # carry its marks to later models' steps; a copy of it on the device (no host sync, as a new one had)
            row_jobs = tuple(index[name] for name in names)
            context.row_jobs = constant_on(row_jobs, torch.int64, inputs.device).clone()
        else:  # one job per token: a new composition each step, so plain tensors (not cached constants); the job
            # segments of the tokens sorted by job are known here, on the host, and reach the layers as data
            token_jobs = [index[name] for name in names]
            context.row_jobs = torch.tensor(token_jobs, dtype=torch.int64, device=inputs.device)
            context.segments = PackedSegments.of(token_jobs, len(context.jobs) + 1, inputs.device)

    def _real_tokens_set(self, context: ForwardContext) -> None:
        if self.__dict__.get("_dynamic_steps"):  # the step's tensors of the context (`dynamic_steps`)
            order = context.segments.order if context.segments is not None and context.segments.order else ()
            mark_rows_and_length(context.row_jobs, *order, context.token_mask)

    # ------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config, model_config):
        if isinstance(peft_config, LoraConfig) and peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
                raise ValueError(f"LoraConfig.target_modules must be given for model type {model_type!r}")
            peft_config.target_modules = set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
        return peft_config

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        if isinstance(peft_config, LoraConfig):
            self.__dict__["_targets"] = {}
            return
        super()._prepare_model(peft_config, model)

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        if not isinstance(peft_config, LoraConfig):
            return super()._check_target_module_exists(peft_config, key)
        if key.endswith(".base_layer") or not check_target_module_exists(peft_config, key):
            return False
        return plain_linear(self.model.get_submodule(key)) is not None

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if not isinstance(peft_config, LoraConfig):
            return super()._create_and_replace(
                peft_config, adapter_name, target, target_name, parent, current_key, **kwargs
            )
        layer = target if isinstance(target, LoraLinear) else LoraLinear(target, adapter_name, self._context())
        r, alpha = peft_config.r, peft_config.lora_alpha
        scaling = alpha / math.sqrt(r) if peft_config.use_rslora else alpha / r
        layer.update_layer(adapter_name, r=r, scaling=scaling, dropout=peft_config.lora_dropout)
        if layer is not target:
            setattr(parent, target_name, layer)

    def _attach_aux_loss(self, outputs, records, labels, shift_labels, num_items_in_batch):
        """Expose {job: aux loss} only; each job's loss adds its own term (MultiJobTrainer, `per_job_losses`). Jobs
        without rows in the call are left out (a compiled step's MixLoRA blocks record every job, masked)."""
        names = self._context().row_adapters
        if names is not None:
            present = set(names)
            records = [record for record in records if record.adapter in present]
            if not records:  # (a compiled step's blocks recorded only absent jobs): the output eager gives
                return outputs
        loads = self.__dict__.get("_router_loads")
        if loads is not None:  # `collecting_router_loads`: each layer's selections and tokens, summed over calls
            for record in records:
                counts, tokens = router_load(*record.loss_inputs())
                so_far = loads.get((record.adapter, record.layer), (0.0, 0.0))
                loads[(record.adapter, record.layer)] = (so_far[0] + counts.detach(), so_far[1] + tokens)
        aux, per_adapter = router_aux_loss(records, self.peft_config, self.__dict__.get("_whole_loads"))
        self.__dict__["last_aux_loss"] = {k: v.detach() for k, v in per_adapter.items()}
        if hasattr(outputs, "keys"):
            outputs = with_fields(outputs, aux_loss=aux, aux_loss_per_adapter=per_adapter)
        return outputs

    # ------------------------------------------------------------------ per-job randomness
    def _set_stream_widths(self, names: list[str] | None, attention_mask: torch.Tensor | None, inputs) -> None:
        """Each job's own width in this padded training batch (the last real token of its rows, + 1), so its
        stream draws over that width only, whatever the length of the rows beside it, and, for a job whose rows are
        a piece of a micro-batch, as for the whole micro-batch (`drawing_pieces`, `ops.dropout.stream_draw`; in a
        packed row, whose layers see each token as a row of width 1, a piece's tokens). Reads the mask's row ends
        back (on a GPU, one sync per training forward with job streams; and one copy of a piece's row indices to the
        device)."""
        streams, widths = self.__dict__.get("_stream_ids") or {}, {}
        if not (streams and self.training and names is not None):
            set_stream_widths(widths)
            return
        step, device = 1, getattr(inputs, "device", None)  # packed: each token a row of width 1 (`unit_view`)
        if attention_mask is not None and attention_mask.dim() == 2 and len(names) == attention_mask.shape[0]:
            step, device, ends = attention_mask.shape[1], attention_mask.device, row_ends(attention_mask).tolist()
            for name, end in zip(names, ends, strict=True):
                if name in streams:
                    widths[streams[name]] = (step, max(end, widths.get(streams[name], (0, 0))[1]))
        elif attention_mask is not None:
            names = ()
        present = set(names)
        for name, (rows, of_rows, width) in (self.__dict__.get("_pieces") or {}).items():
            if name in streams and name in present:
                index = torch.tensor(rows, device=device)  # once a forward, not once a draw
                widths[streams[name]] = (step, width, index, of_rows)
        set_stream_widths(widths)

    @contextlib.contextmanager
    def drawing_pieces(self, pieces: dict[str, tuple[list[int], int, int]]):
        """Within it, a job in `pieces` ({job: (rows, micro-batch rows, micro-batch width)}), whose rows in the
        training forwards are those rows of a right-padded micro-batch of that many rows and own width (its longest
        row's real length) cut into several steps, draws as for that whole micro-batch (`ops.dropout.stream_draw`).
        Its stream must start each piece from the state the micro-batch began with (the trainer restarts it)."""
        self.__dict__["_pieces"] = dict(pieces)
        try:
            yield
        finally:
            self.__dict__["_pieces"] = None

    @contextlib.contextmanager
    def collecting_router_loads(self):
        """Within it, each forward adds every MoE layer's selections per expert and tokens that count
        (`routing.router_load`) to the dict it yields, {(job, layer): (counts (E,), tokens)}: the pieces of a
        micro-batch run under it without autograd give the whole's `WholeLoad` (`whole_router_loads`)."""
        self.__dict__["_router_loads"] = loads = {}
        try:
            yield loads
        finally:
            self.__dict__["_router_loads"] = None

    @contextlib.contextmanager
    def whole_router_loads(self, whole: dict[tuple[str, str], WholeLoad] | None):
        """Within it, a job with {(job, layer): `WholeLoad`} entries trains a piece of a micro-batch: its aux loss is
        its share of the whole's, with the whole's expert loads f and token count (`router_aux_loss`); so the
        pieces' losses and gradients add up to the whole's (MultiJobTrainer's out-of-memory retry in halves)."""
        self.__dict__["_whole_loads"] = whole or None
        try:
            yield
        finally:
            self.__dict__["_whole_loads"] = None

    def set_job_streams(self, seeds: dict[str, int]) -> dict[str, torch.Generator]:
        """Give each job in `seeds` a random stream of its own, seeded with its seed: its dropout masks and router
        jitter are then drawn from it, whatever other jobs share a step (`ops.job_streams`). Returns
        {job: generator} (on the device of the job's first parameter), whose states a checkpoint keeps. A job that
        had a stream on this model keeps its id (its new generator takes the id's place): a compiled step, whose
        guards hold the ids, is not compiled again at the next `train()`. A copy of the model gets ids of its own."""
        generators, streams, before = {}, {}, self.__dict__.get("_stream_ids") or {}
        for job, seed in seeds.items():
            device = next(iter(self.job_parameters(job).values())).device
            generators[job] = torch.Generator(device=device)
            generators[job].manual_seed(int(seed))
            streams[job] = register_stream(generators[job], reuse=before.get(job), owner=self)
        for name, module in self.model.named_modules():
            key = name.rsplit(".", 1)[-1]
            if isinstance(module, Dropout) and key in streams:  # a job's entry of a layer's dropout ModuleDict
                module.use_stream(streams[key])
            if isinstance(module, RoutedExpertsLayer):
                for job, settings in module.settings.items():
                    if job in streams:
                        settings.jitter_stream = streams[job]
        replay_streams_in_checkpoints(self.model)  # layers checkpointed already recompute with the same draws
        self.__dict__["_stream_ids"] = streams
        return generators

    # ------------------------------------------------------------------ per-job export
    def expert_settings(self, name: str) -> list:
        """The `ExpertSettings` of job `name` in each of its routed-experts layers (none for a LoRA job)."""
        return [module.settings[name] for module in self.model.modules()
                if isinstance(module, RoutedExpertsLayer) and name in module.settings]

    def _check_job(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"unknown job {name!r}; jobs: {sorted(self.peft_config)}")

    def job_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """{parameter name in this model: parameter} of one job."""
        self._check_job(name)
        return {n: p for n, p in self.model.named_parameters() if adapter_of(n, _INTERNAL_PREFIX) == name}

    def job_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """One job's tensors under the keys its own PEFT method saves and loads (`adapter_model.safetensors`)."""
        config = self.peft_config[name]
        out = {}
        for param_name, param in self.job_parameters(name).items():
            out[_export_key(param_name, name, config)] = param.detach().contiguous().clone()
        return out

    def save_job(self, name: str, directory: str) -> None:
        """Write `adapter_config.json`, `adapter_model.safetensors` and a model card (README.md) of one job into
        `directory`; the config names the base (as `get_peft_model` records it), so `AutoPeftModelForCausalLM`
        loads the folder alone."""
        self._check_job(name)  # (before anything is written)
        os.makedirs(directory, exist_ok=True)
        config = self.peft_config[name]
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.model, "name_or_path", None) or None
        # as PeftModel.save_pretrained: without a task type, the base's class for AutoPeftModel
        auto = None if config.task_type else {"base_model_class": type(self.model).__name__,
                                               "parent_library": type(self.model).__module__}
        config.save_pretrained(directory, auto_mapping_dict=auto)
        if isinstance(config, LoraConfig):  # (peft-mole configs write their card in `save_pretrained`)
            update_model_card(directory, config)
        save_file(self.job_state_dict(name), os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})

    def load_job(self, name: str, directory: str) -> None:
        """Copy a job's saved weights (`save_job` format) back into this model; every tensor must match."""
        self._check_job(name)
        saved = load_file(os.path.join(directory, "adapter_model.safetensors"))
        config = self.peft_config[name]
        params = {_export_key(n, name, config): p for n, p in self.job_parameters(name).items()}
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"{directory} does not fit job {name!r}: missing {missing[:3]}, unexpected {unexpected[:3]} tensors"
            )
        for key, param in params.items():  # every shape before any copy (before 2026-12-08 the tensors copied ahead of
            if saved[key].shape != param.shape:  # a mismatch stayed overwritten)
                raise ValueError(f"{directory}: {key} has shape {tuple(saved[key].shape)}, job {name!r} needs "
                                 f"{tuple(param.shape)}")
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(saved[key])


def _export_key(param_name: str, job: str, config: PeftConfig) -> str:
    """Our parameter name → the key the job's PEFT method uses in adapter_model.safetensors.

    `model.layers.0.mlp.base_layer.gate_proj.mixlora_A.job.weight` →
    `base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight` (LoRA); for MixLoRA/DynMoLE the adapter name is
    dropped and the prefix becomes the method's, and so is a LoRA factor's `.weight` (`attention.LoraFactor`: saved
    under its container's key, `...q_proj.mixlora_A`).
    """
    parts = factor_key_without_weight(param_name, _INTERNAL_PREFIX, job).split(".")
    kept = [p for i, p in enumerate(parts) if p != "base_layer" and not (i and parts[i - 1].startswith(_INTERNAL_PREFIX))]
    key = ".".join(kept)
    if isinstance(config, LoraConfig):
        key = re.sub(rf"{_INTERNAL_PREFIX}(A|B)$", r"lora_\1.weight", key)
    elif isinstance(config, DynMoLEConfig):
        key = key.replace(_INTERNAL_PREFIX, "dynmole_")
    return "base_model.model." + key
