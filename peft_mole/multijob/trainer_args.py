"""How `MultiJobTrainer` takes SFTTrainer's arguments: the `SFTConfig` options it cannot honour, refused when it is
built; the numbers and callbacks it checks; the base model loaded from a path as SFTTrainer loads it.

MultiJobTrainer runs its own training loop (one mixed step for many jobs), so what `Trainer.train` would do with
these options never happens; each is refused with what to do instead, rather than silently ignored.
"""

from __future__ import annotations

import contextlib
import math

PUSH_EACH_JOB = (
    "each job is saved as its own PEFT adapter in output_dir/<job>/; push it after training with "
    "`peft_mole.push_to_hub(PeftModel.from_pretrained(base, path), repo_id)` (its model card included) or "
    "`huggingface_hub.upload_folder`"
)

UNSUPPORTED = {
    "neftune_noise_alpha": (
        lambda value: value is not None,
        "NEFTune noise is scaled by the batch's padded length, which in a mixed step is not the job's own; "
        "set neftune_noise_alpha=None",
    ),
    "use_liger_kernel": (bool, "Liger kernels replace the layers the jobs' adapters wrap; set use_liger_kernel=False"),
    "auto_find_batch_size": (
        bool,
        "MultiJobTrainer shrinks a step that runs out of memory itself (fewer jobs per step, a LoRA job's rows in "
        "halves) and keeps every job's batch size; set auto_find_batch_size=False",
    ),
    "push_to_hub": (bool, f"{PUSH_EACH_JOB}; set push_to_hub=False"),
    "label_smoothing_factor": (
        bool, "each job's loss is the negative log-likelihood of its targets (TRL's loss_type='nll'); set it to 0",
    ),
    "loss_type": (
        lambda value: value not in (None, "nll"),
        "each job's loss is the negative log-likelihood of its targets; set loss_type='nll'",
    ),
    "activation_offloading": (bool, "the mixed steps do not offload activations; set activation_offloading=False"),
    "ignore_data_skip": (
        bool, "a resumed job goes on with the batches after its checkpoint's (its epoch's order is kept); set "
        "ignore_data_skip=False",
    ),
    "optim": (
        lambda value: option_name(value).startswith(("galore", "apollo", "lomo", "adalomo", "schedule_free")),
        "each job's optimizer steps its own adapter tensors; GaLore, APOLLO and LOMO optimizers take the whole model "
        "or per-layer hooks, and schedule-free ones need Trainer's train()/eval() mode calls; choose another optim "
        "(adamw_torch_fused, adamw_torch, sgd, adafactor, adagrad, rmsprop or a bitsandbytes optimizer)",
    ),
    "save_on_each_node": (
        bool, "each job's checkpoints and final adapter are written once, by the world's process zero, and every "
        "process reads them (a resume, load_best_model_at_end): put output_dir on storage all nodes share and leave "
        "save_on_each_node off",
    ),
    "deepspeed": (bool, "DeepSpeed is not supported; use `accelerate launch` with plain data parallelism"),
    "fsdp": (bool, "FSDP is not supported; use `accelerate launch` with plain data parallelism"),
}


NUMBERS = {
    "learning_rate": (False, 0, True), "num_train_epochs": (False, 0, True), "warmup_steps": (False, 0, False),
    "weight_decay": (False, 0, False), "max_grad_norm": (False, 0, False), "seed": (True, 0, False),
    "save_steps": (False, 0, True), "logging_steps": (False, 0, True),
    "eval_steps": (False, 0, False),  # (0: every logging_steps, as in TrainingArguments)
    "per_device_train_batch_size": (True, 1, False), "gradient_accumulation_steps": (True, 1, False),
}


STEP_INTERVALS = ("save_steps", "logging_steps", "eval_steps")
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")  # their step() takes an evaluation metric


class JobSetupError(ValueError):
    """A job cannot start as set up (no batch from its rows, a checkpoint that cannot be resumed): raised as
    `train()` begins, before any step."""


def check_max_steps(owner: str, steps) -> None:
    """`max_steps`: an int >= 1, or -1 to train by epochs (Trainer trains by epochs for a negative value, and
    not at all for 0)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps == 0 or steps < -1:
        raise ValueError(f"{owner}: max_steps must be an int >= 1 (or -1 for epochs), got {steps!r}")


def check_number(owner: str, name: str, value) -> None:
    """Raise ValueError where `value` (None: unset) is not a number of the kind and range NUMBERS gives `name`."""
    if value is None:
        return
    integer, low, strict = NUMBERS[name]
    kind = (int,) if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)
            or value < low or (strict and value == low)):
        what = "an int" if integer else "a finite number"
        raise ValueError(f"{owner}: {name} must be {what} {'>' if strict else '>='} {low}, got {value!r}")
    if name == "seed" and value >= 2**32:  # (transformers' set_seed, numpy's generator)
        raise ValueError(f"{owner}: seed must be an int in [0, 2**32), got {value!r}")
    if name in STEP_INTERVALS and value > 1 and value != int(value):  # (a fraction <= 1: of the job's max_steps)
        raise ValueError(f"{owner}: {name} must be an integer if bigger than 1 (as TrainingArguments), got {value!r}")


def check_trainer_args(args, configs: dict) -> None:
    """Raise ValueError naming the first option set in `args` that MultiJobTrainer cannot honour for the jobs'
    peft `configs` ({name: config})."""
    # first: it sets metric_for_best_model itself (`check_best_model_args`), and the user set this, not that
    check_lr_scheduler(args.lr_scheduler_type, "lr_scheduler_type")
    for field, (is_set, advice) in UNSUPPORTED.items():
        value = getattr(args, field, None)
        if is_set(value):
            raise ValueError(f"MultiJobTrainer does not support {field}={value!r}: {advice}")
    if getattr(getattr(args, "accelerator_config", None), "even_batches", True) is False:
        raise ValueError(
            "MultiJobTrainer does not support accelerator_config={'even_batches': False}: each process would plan "
            "a job's steps from its own shard's length, so processes with uneven shards would run different "
            "collectives and hang (or abort every job); keep even_batches=True, the default")
    if getattr(getattr(args, "accelerator_config", None), "dispatch_batches", None) is True:
        raise ValueError(
            "MultiJobTrainer does not support accelerator_config={'dispatch_batches': True}: process 0 would read "
            "every job's data and send each batch in a collective, so a job whose data raises there (or whose "
            "micro-batches differ in width) leaves the other processes waiting in that collective; leave "
            "dispatch_batches unset (each process reads its own shard)")
    coefficient = args.router_aux_loss_coef  # (SFTConfig's; None: the models' own)
    if coefficient is not None and (isinstance(coefficient, bool) or not isinstance(coefficient, (int, float))
                                    or not math.isfinite(coefficient) or coefficient < 0):
        raise ValueError(f"router_aux_loss_coef must be None or a finite number >= 0, got {coefficient!r}")
    for name in NUMBERS:  # the jobs' defaults: checked as each job's own values are (`JobConfig`)
        check_number("trainer arguments", name, getattr(args, name, None))
    check_max_steps("trainer arguments", args.max_steps)  # (0 trained by epochs here, nothing in Trainer)
    check_compile_args(args)
    for field in CHECKPOINTING_KWARGS:
        if (getattr(args, field, None) or {}).get("use_reentrant"):
            raise ValueError(
                f"MultiJobTrainer does not support {field}={{'use_reentrant': True}}: it takes each job's gradients "
                "with torch.autograd.grad, which never re-runs reentrant checkpointed layers (the adapters would get "
                "no gradient); leave use_reentrant unset or set it to False"
            )


CHECKPOINTING_KWARGS = ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")


def check_compile_args(args) -> None:
    """What compiled steps rule out: a context_fn for checkpointing."""
    for field in CHECKPOINTING_KWARGS:
        if args.torch_compile and "context_fn" in (getattr(args, field, None) or {}):
            raise ValueError(
                f"MultiJobTrainer does not support torch_compile=True with a context_fn in {field}: compiled "
                "checkpointed layers checkpoint selectively to keep each job's random draws "
                "(`peft_mole.ops.stream_checkpoint`), which a context_fn of yours would replace; remove it"
            )


def option_name(value) -> str:
    """A TrainingArguments option (a strategy or scheduler enum, or its string) as its string: "steps"."""
    return str(getattr(value, "value", value))


def check_lr_scheduler(value, where: str) -> None:
    """Refuse a name transformers has no scheduler for (when the job is made, not when it starts) and schedulers
    that step on an evaluation metric ("reduce_lr_on_plateau", "greedy"): a job's scheduler steps with its optimizer,
    on no metric."""
    from transformers import SchedulerType

    try:
        SchedulerType(value)
    except ValueError:
        raise ValueError(f"{where} must be one of {[kind.value for kind in SchedulerType]}, got {value!r}") from None
    if option_name(value) in METRIC_SCHEDULERS:
        raise ValueError(f"MultiJobTrainer does not support {where}={option_name(value)!r} (each job's scheduler "
                         "steps with its optimizer, on no metric); choose a step-based one such as 'linear' or "
                         "'cosine'")


def check_job_schedulers(args, jobs) -> None:
    """Build each job's learning-rate scheduler once on a stand-in optimizer, as `train()` builds it (the job's
    lr_scheduler_type and lr_scheduler_kwargs, each else the trainer's): a type that refuses the kwargs (the
    trainer's cosine_with_min_lr's `min_lr` for a job's "linear") or lacks one it needs fails here, naming the job,
    rather than at `train()` for every job."""
    import torch
    from transformers import get_scheduler

    for job in jobs:
        resolved = job.training_args(args, warn=False)
        kind, kwargs = resolved.lr_scheduler_type, resolved.lr_scheduler_kwargs or {}
        # the job's learning rate (a kwarg may be checked against it: polynomial's lr_end) and two groups, as its
        # optimizer has (decayed and not)
        stand_in = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]},
                                    {"params": [torch.zeros(1, requires_grad=True)]}], lr=resolved.learning_rate)
        try:
            get_scheduler(kind, stand_in, num_warmup_steps=0, num_training_steps=2, scheduler_specific_kwargs=kwargs)
        except (TypeError, ValueError) as error:
            source = "its own" if job.lr_scheduler_kwargs is not None else "the trainer's"
            raise ValueError(f"job {job.name!r}: lr_scheduler_type={option_name(kind)!r} cannot be built with {source} "
                             f"lr_scheduler_kwargs={kwargs!r} ({error}); give the job its own "
                             "JobConfig(lr_scheduler_kwargs=...)") from None


def check_trainer_inputs(model, jobs, callbacks, kwargs: dict) -> None:
    """MultiJobTrainer's own arguments, before anything is built: a base model (not a PeftModel), a non-empty list
    of `JobConfig` with unique names, callbacks, and none of SFTTrainer's keywords it replaces or cannot call."""
    from peft import PeftModel
    from torch import nn

    from peft_mole.multijob.jobs import JobConfig  # (here: jobs imports this module)

    if "peft_config" in kwargs or "train_dataset" in kwargs or "eval_dataset" in kwargs:
        raise TypeError("MultiJobTrainer takes the adapters and datasets from jobs=[JobConfig(...)] (each job's "
                        "train_dataset and eval_dataset), not peft_config/train_dataset/eval_dataset")
    check_callbacks(callbacks)
    optimizers = kwargs.get("optimizers", (None, None))
    if kwargs.get("optimizer_cls_and_kwargs") is not None or any(o is not None for o in optimizers or ()):
        given = "optimizers" if "optimizers" in kwargs else "optimizer_cls_and_kwargs"
        raise ValueError(f"MultiJobTrainer does not support {given}: every job gets an optimizer and a learning-rate "
                         "schedule of its own, built from `optim`, `optim_args` and the job's learning_rate, "
                         "weight_decay, lr_scheduler_type and lr_scheduler_kwargs (JobConfig); set those instead")
    if kwargs.get("compute_loss_func") is not None:  # (before 2026-12-08 taken and never called)
        raise ValueError("MultiJobTrainer does not support compute_loss_func: its mixed step computes each job's loss "
                         "as SFTTrainer's default (the mean token NLL of the job's rows, plus the router's auxiliary "
                         "loss); train a job with a loss of its own in SFTTrainer")
    for unsupported in ("compute_metrics", "preprocess_logits_for_metrics"):
        if kwargs.get(unsupported) is not None:  # it would be silently never called
            raise ValueError(f"MultiJobTrainer does not support {unsupported}: each job's evaluation logs "
                             "<job>/eval_loss; score a job's saved adapter with SFTTrainer or evaluate_commonsense")
    if not isinstance(jobs, (list, tuple)) or not jobs or not all(isinstance(j, JobConfig) for j in jobs):
        raise TypeError(f"jobs must be a non-empty list of JobConfig, got {jobs!r}")
    folded = [j.name.casefold() for j in jobs]  # (each names a folder: "A" and "a" are one on macOS and Windows)
    duplicates = sorted({j.name for j in jobs if folded.count(j.name.casefold()) > 1})
    if duplicates:
        raise ValueError(f"job names must be unique, whatever their case (each names an output folder); used more "
                         f"than once: {duplicates}")
    if isinstance(model, PeftModel):
        raise TypeError("pass the base model: MultiJobTrainer adds every job's adapter itself")
    if not isinstance(model, (str, nn.Module)):
        raise TypeError(f"model must be a base model (a torch module) or its path or hub id, got {model!r}")
    if isinstance(model, nn.Module):
        check_no_adapter_layers(model)


def check_optimizer_hooks(trainer_cls: type) -> None:
    """A subclass's `create_optimizer`/`create_scheduler`/`create_optimizer_and_scheduler` would never be called:
    each job's optimizer and schedule are made by `MultiJobTrainer._make_run`; nor would its `compute_loss`,
    `training_step` or `prediction_step` (refused since 2026-12-08): the mixed step computes each job's loss itself."""
    from trl import SFTTrainer

    for hook in ("create_optimizer", "create_scheduler", "create_optimizer_and_scheduler"):
        if getattr(trainer_cls, hook) is not getattr(SFTTrainer, hook):
            raise ValueError(f"{trainer_cls.__name__} overrides {hook}, which MultiJobTrainer never calls: every job "
                             "gets an optimizer and a schedule of its own (`MultiJobTrainer._make_run`, from `optim`, "
                             "`optim_args` and the job's hyper-parameters); remove the override and set those")
    for hook in ("compute_loss", "training_step", "prediction_step"):
        if getattr(trainer_cls, hook) is not getattr(SFTTrainer, hook):
            raise ValueError(f"{trainer_cls.__name__} overrides {hook}, which MultiJobTrainer never calls: its mixed "
                             "step computes each job's loss as SFTTrainer's default (the mean token NLL of the job's "
                             "rows, plus the router's auxiliary loss); train a job with a loss of its own in "
                             "SFTTrainer")


def check_no_adapter_layers(model) -> None:
    """Refuse a base that holds adapter layers already. `SFTTrainer(peft_config=...)`, `get_peft_model`,
    `load_adapter` and a `MultiJobTrainer` that was made put them into the base model in place, so a base trained
    that way is no longer plain: every job would fail at its first step, each row meeting the earlier adapter too.
    (A MultiJobTrainer whose set-up fails gives its base back.)"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        names = sorted(getattr(model, "peft_config", None) or {})
        raise ValueError(
            f"model already holds adapter layers (adapters {names}): SFTTrainer(peft_config=...), get_peft_model, "
            "load_adapter and MultiJobTrainer add them into the base model itself. Pass a freshly loaded base, or "
            "the base as `peft_model.unload()` (or an earlier MultiJobTrainer's `trainer.jobs_model.unload()`) gives "
            "it back; to go on from a saved adapter, use JobConfig(init_adapter=its folder)")


def check_step_overhead_tokens(value) -> None:
    """`step_overhead_tokens`: "auto", None or an int >= 0."""
    if value not in (None, "auto") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"step_overhead_tokens must be 'auto', an int >= 0 or None, got {value!r}")


def check_callbacks(callbacks) -> None:
    """Refuse transformers' EarlyStoppingCallback: it watches one eval metric of the whole run, which several jobs
    do not have; each job stops on its own evaluations with `JobConfig(early_stopping_patience=...)`."""
    from transformers import EarlyStoppingCallback

    for callback in callbacks or ():
        if callback is EarlyStoppingCallback or isinstance(callback, EarlyStoppingCallback):
            raise ValueError("MultiJobTrainer does not support EarlyStoppingCallback: each job stops on its own "
                             "evaluations; set JobConfig(early_stopping_patience=..., eval_dataset=..., eval_steps=...)")


def take_accelerate_compile(trainer) -> None:
    """A compile backend set in the accelerate config (`accelerate launch --dynamo_backend B`), with which Trainer's
    Accelerator compiles the model, compiles the mixed steps as `torch_compile=True` with that backend and mode
    does (before 2026-12-07 it was ignored: the steps ran eagerly)."""
    plugin = getattr(trainer.accelerator.state, "dynamo_plugin", None)
    backend = str(getattr(getattr(plugin, "backend", None), "value", "NO"))
    if trainer.args.torch_compile or backend.upper() == "NO":
        return
    trainer.args.torch_compile, trainer.args.torch_compile_backend = True, backend.lower()
    trainer.args.torch_compile_mode = getattr(plugin, "mode", None)
    check_compile_args(trainer.args)


def check_distributed(trainer) -> None:
    """Refuse DeepSpeed and FSDP also where they come from the accelerate config rather than the arguments."""
    for name, on in (("DeepSpeed", trainer.is_deepspeed_enabled), ("FSDP", trainer.is_fsdp_enabled)):
        if on:
            raise ValueError(f"MultiJobTrainer does not support {name} (set in the accelerate config); use "
                             "`accelerate launch` with plain data parallelism")


@contextlib.contextmanager
def temporarily(owner, name: str, value):
    """Within it, `owner.<name>` is `value`; the old value is set back after (also on an error)."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def without_aux_coefficient(args):
    """Within it, `args.router_aux_loss_coef` is None, so that SFTTrainer's `__init__` neither refuses a coefficient
    for the dense base nor sets up its own aux loss: MultiJobTrainer adds each MixLoRA/DynMoLE job's aux loss itself,
    scaled by the coefficient as SFTTrainer scales it (None: 1.0, the coefficient its adapters declare)."""
    return contextlib.nullcontext() if args is None else temporarily(args, "router_aux_loss_coef", None)


def without_init_kwargs(args, loaded: bool):
    """Within it, `args.model_init_kwargs` is None where the model was `loaded` from a path with them already
    (`load_base_model`): SFTTrainer's `__init__`, given the loaded model, would warn that they are ignored."""
    if args is None or not loaded:
        return contextlib.nullcontext()
    return temporarily(args, "model_init_kwargs", None)


def with_adapters_declared(model):
    """Within it, a quantised `model` says it carries adapters (transformers' `_hf_peft_config_loaded`), as the
    jobs' adapters are injected in it: `Trainer.__init__` refuses to fine-tune a quantised model that is neither a
    `PeftModel` nor so marked (`validate_quantization_for_training`), where SFTTrainer, given a `peft_config`, has
    wrapped it in one (the mark also passes its refusal of a compiled quantised model, which SFTTrainer's
    PeftModel passes too). Only within: the flag also turns transformers' own adapter methods on."""
    if not getattr(model, "is_quantized", False) or getattr(model, "_hf_peft_config_loaded", True):
        return contextlib.nullcontext()  # (not quantised; marked already; or not a transformers model)
    return temporarily(model, "_hf_peft_config_loaded", True)


def load_base_model(path: str, args=None, quantization_config=None):
    """The base model at `path` (a local directory or a hub id), loaded as `SFTTrainer(model=path)` loads it: after
    `set_seed(args.seed)`, with `args.model_init_kwargs` (and `quantization_config`), float32 unless they give a
    `dtype` (transformers alone keeps the checkpoint's, e.g. bfloat16), `trust_remote_code` from `args`, and no
    `device_map` when several processes train."""
    from accelerate import PartialState
    from transformers import set_seed
    from trl import SFTConfig
    from trl.trainer.utils import create_model_from_path

    set_seed(args.seed if args is not None else SFTConfig.seed)
    kwargs = dict((args and args.model_init_kwargs) or {})
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise ValueError("quantization_config is set both as a trainer argument and in args.model_init_kwargs; "
                             "set it in one place")
        kwargs["quantization_config"] = quantization_config
    distributed = args.distributed_state if args is not None else PartialState()
    if distributed.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None
    if args is not None:
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(path, **kwargs)
