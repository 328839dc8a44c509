"""The `SFTConfig` options that `MultiJobTrainer` cannot honour, refused when it is built.

MultiJobTrainer runs its own training loop (one mixed step for many jobs), so what `Trainer.train` would do with
these options never happens; each is refused with what to do instead, rather than silently ignored.
"""

from __future__ import annotations

UNSUPPORTED = {
    "neftune_noise_alpha": (
        lambda value: value is not None,
        "NEFTune noise is scaled by the batch's padded length, which in a mixed step is not the job's own; "
        "set neftune_noise_alpha=None",
    ),
    "torch_compile": (
        bool,
        "the mixed steps run eagerly (their row groups change from step to step); set torch_compile=False",
    ),
    "use_liger_kernel": (bool, "Liger kernels replace the layers the jobs' adapters wrap; set use_liger_kernel=False"),
    "auto_find_batch_size": (
        bool,
        "MultiJobTrainer shrinks a step that runs out of memory itself (fewer jobs per step, a LoRA job's rows in "
        "halves) and keeps every job's batch size; set auto_find_batch_size=False",
    ),
    "push_to_hub": (
        bool,
        "each job is saved as its own PEFT adapter in output_dir/<job>/; push it after training with "
        "`PeftModel.from_pretrained(base, path).push_to_hub(repo_id)` or `huggingface_hub.upload_folder`; "
        "set push_to_hub=False",
    ),
    "deepspeed": (bool, "DeepSpeed is not supported; use `accelerate launch` with plain data parallelism"),
    "fsdp": (bool, "FSDP is not supported; use `accelerate launch` with plain data parallelism"),
}


def check_trainer_args(args) -> None:
    """Raise ValueError naming the first option set in `args` that MultiJobTrainer cannot honour."""
    for field, (is_set, advice) in UNSUPPORTED.items():
        value = getattr(args, field, None)
        if is_set(value):
            raise ValueError(f"MultiJobTrainer does not support {field}={value!r}: {advice}")
