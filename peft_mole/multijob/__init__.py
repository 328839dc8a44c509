"""Multi-job training (ASPEN, SPEC.md §3): several adapters trained at once on one frozen base.

This package holds the pieces the MultiJobTrainer (planned) builds on: mixed-adapter batches and the per-job
loss that gives each job exactly the gradients it would get if trained alone.
"""

from peft_mole.multijob.batching import MixedBatch, mixed_batch
from peft_mole.multijob.loss import per_job_losses

__all__ = ["MixedBatch", "mixed_batch", "per_job_losses"]
