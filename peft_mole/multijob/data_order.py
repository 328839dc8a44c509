"""A job's data order: its data pipeline draws from a random state of its own.

Trainer's data pipeline draws from torch's global CPU generator, at the start of each epoch's iterator: a
`DataLoader` draws its workers' base seed, and the length-grouped sampler (`train_sampling_strategy=
"group_by_length"`, `LengthGroupedSampler`, which has no generator of its own) its permutation. A plain SFTTrainer
run draws them from the state `set_seed(args.seed)` left. In a multi-job run the global generator is one for all
jobs, and other jobs' epochs begin at other times, so a job's length-grouped order was not the one its run alone
would have (and a resumed run drew its permutation again from whatever state the resume left).

Here each job's fetches (the start of an epoch, each window's micro-batches) run with the job's own state swapped
in for the global one (`drawing`), starting from the state right after `set_seed(job seed)`: its first epoch is
ordered as the job's run alone; later epochs too where that run draws nothing else from the global generator
between epochs (no dropout, router jitter or evaluation draws there). A checkpoint keeps the state the resumed
run's next iterator starts from (`resume_state`), so resume continues in the uninterrupted run's order.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

DATA_ORDER_FILE = "data_order.safetensors"  # a checkpoint's `resume_state` of the job's data pipeline


class DataRandomState:
    """One job's CPU random state for its data pipeline. `state`: where its next draw starts; `epoch_start`: the
    state its current epoch's iterator started from; `at_step`: the state as of its last optimizer step."""

    def __init__(self, state: torch.Tensor | None = None) -> None:
        self.state = torch.random.get_rng_state() if state is None else state.clone()
        self.epoch_start = self.state
        self.at_step = self.state

    @contextmanager
    def drawing(self, epoch_start: bool = False):
        """Run the block with this state as torch's global CPU state, then keep where it ended and put the global
        state back. `epoch_start`: the block starts an epoch's iterator (its state is kept for `resume_state`)."""
        if epoch_start:
            self.epoch_start = self.state
        outer = torch.random.get_rng_state()
        torch.random.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = torch.random.get_rng_state()
            torch.random.set_rng_state(outer)

    def mark_step(self) -> None:
        """Note the state as of an optimizer step (a window fetched since is fetched again after a resume)."""
        self.at_step = self.state

    def resume_state(self, mid_epoch: bool) -> torch.Tensor:
        """The state a resumed run's next iterator starts from: within an epoch, the state the epoch began with
        (its iterator is made again and skips the trained batches); at an epoch's end, the state as of the last
        step, from which the next epoch begins."""
        return self.epoch_start if mid_epoch else self.at_step
