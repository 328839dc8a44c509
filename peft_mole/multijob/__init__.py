"""Multi-job training (ASPEN, SPEC.md §3): several adapters trained at once on one frozen base.

`MultiJobTrainer` (a TRL `SFTTrainer`) trains a list of `JobConfig`s in mixed-adapter batches; `MultiJobModel`
hosts LoRA, MixLoRA and DynMoLE jobs on one base; `mixed_batch` mixes the jobs' micro-batches, and
`per_job_losses` gives each job's loss of a mixed step as the trainer assembles it.
"""

from peft_mole.multijob.batching import MixedBatch, mixed_batch
from peft_mole.multijob.jobs import JobConfig
from peft_mole.multijob.loss import per_job_losses
from peft_mole.multijob.model import MultiJobModel

__all__ = ["JobConfig", "MixedBatch", "MultiJobModel", "MultiJobTrainer", "mixed_batch", "per_job_losses"]


def __getattr__(name: str):
    if name == "MultiJobTrainer":  # imports TRL: only when asked for
        from peft_mole.multijob.trainer import MultiJobTrainer

        return MultiJobTrainer
    raise AttributeError(name)
