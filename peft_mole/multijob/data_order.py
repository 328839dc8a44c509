"""A job's data order: its data pipeline draws from a random state of its own.

Trainer's data pipeline draws from torch's global CPU generator, at the start of each epoch's iterator: a
`DataLoader` draws its workers' base seed (with persistent workers only at its first iterator), and the
length-grouped sampler (`train_sampling_strategy="group_by_length"`, `LengthGroupedSampler`, which has no generator
of its own) its permutation. A plain SFTTrainer run draws them from the state `set_seed(args.seed)` left. In a
multi-job run the global generator is one for all jobs, and other jobs' epochs begin at other times, so a job's
length-grouped order was not the one its run alone would have (and a resumed run drew its permutation again from
whatever state the resume left).

Here each job's fetches (the start of an epoch, each window's micro-batches) run with the job's own state swapped
in for torch's global CPU generator (`drawing`; Python's `random` and numpy, which a custom collator might use,
stay shared), starting from the state right after `set_seed(job seed)` and the job's loader
being prepared, and so does its evaluation with `eval_on_start` (`drawing_before_training`): its first epoch is
ordered as the job's run alone; later epochs too where that run draws nothing else from the global generator
between epochs (no dropout, router jitter or evaluation draws there). The same holds for a random sampler that is
not accelerate's seedable one (`use_seedable_sampler=False`). A checkpoint keeps the state the resumed
run's next iterator starts from (`resume_state`), and that of the sampler's own generator where it has one
(accelerate gives the length-grouped sampler one on several processes with `use_seedable_sampler=False`), so
resume continues in the uninterrupted run's order. A resumed run makes iterators the uninterrupted run did not
(the resumed epoch's, which skips the trained batches, and with persistent workers a first one of the job's loader
after it): `start_iterator` draws their base seed where the uninterrupted run's iterator drew one, and only there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.data_loader import SeedableRandomSampler
from torch.utils.data import SequentialSampler

DATA_ORDER_FILE = "data_order.safetensors"  # a checkpoint's `resume_state` of the job's data pipeline


def batch_sampler_of(loader):
    """The loader's batch sampler, inside accelerate's shard of it on several processes (`BatchSamplerShard`), or
    None."""
    batches = getattr(loader, "batch_sampler", None)
    return getattr(batches, "batch_sampler", batches)


def sampler_of(loader):
    """The sampler of the loader's batch sampler (`batch_sampler_of`), or None."""
    return getattr(batch_sampler_of(loader), "sampler", None)


def sampler_generator(loader) -> torch.Generator | None:
    """The generator of the loader's sampler, where it has one of its own (None: it draws from the global one)."""
    generator = getattr(sampler_of(loader), "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def seeded_per_epoch(loader) -> bool:
    """Whether the loader's order needs no random state from a checkpoint: sequential, accelerate's seedable
    sampler (seeded with the seed and the epoch at each epoch; Trainer's default) or transformers' rebalancing batch
    sampler (`batch_rebalance`, likewise)."""
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    return (isinstance(batch_sampler_of(loader), BatchRebalanceSampler)
            or isinstance(sampler_of(loader), (SeedableRandomSampler, SequentialSampler)))


class DataRandomState:
    """One job's CPU random state for its data pipeline. `state`: where its next draw starts; `epoch_start`: the
    state its current epoch's iterator started from; `at_step`: the state as of its last optimizer step. The same
    three for the sampler's own generator, where it has one (`sampler`, else None)."""

    def __init__(self, state: torch.Tensor | None = None, sampler: torch.Generator | None = None) -> None:
        self.state = torch.random.get_rng_state() if state is None else state.clone()
        self.sampler = sampler
        self.epoch_start = self.at_step = self._states()

    def _states(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.state, None if self.sampler is None else self.sampler.get_state()

    @contextmanager
    def drawing(self) -> Iterator[None]:
        """Run the block with this state as torch's global CPU state, then keep where it ended and put the global
        state back (not nested: an inner block's draws would be lost)."""
        outer = torch.random.get_rng_state()
        torch.random.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = torch.random.get_rng_state()
            torch.random.set_rng_state(outer)

    @contextmanager
    def drawing_before_training(self) -> Iterator[None]:
        """`drawing`, for draws a run alone makes before its first epoch (`eval_on_start`'s eval loader): the job's
        epoch and resume states start after them."""
        with self.drawing():
            yield
        self.epoch_start = self.at_step = self._states()

    def start_iterator(self, loader, epoch: int) -> Iterator:
        """`iter(loader)` for epoch `epoch` (its states kept for `resume_state`). The job's loader draws its base
        seed at each epoch, with persistent workers at its first only; a new iterator where a run without a resume
        drew none (a resumed run's) takes its base seed from a copy of the state, drawing nothing, so the order goes
        on as in that run (what workers draw inside, e.g. a collator's own randomness, does not).
        """
        self.epoch_start = self._states()
        inner = getattr(loader, "base_dataloader", loader)  # (accelerate's loaders wrap a torch DataLoader)
        persistent = getattr(inner, "persistent_workers", False) and getattr(inner, "num_workers", 0) > 0
        new_iterator = getattr(inner, "_iterator", None) is None and getattr(inner, "generator", True) is None
        if persistent and new_iterator and epoch > 0:  # (would draw its base seed from the global generator)
            # (kept: accelerate's iterator makes the DataLoader's at its first batch; with persistent workers the
            # loader never draws a base seed again)
            inner.generator = torch.Generator()
            inner.generator.set_state(self.state)
        with self.drawing():
            return iter(loader)

    def mark_step(self) -> None:
        """Note the states as of an optimizer step (a window fetched since is fetched again after a resume)."""
        self.at_step = self._states()

    def resume_state(self, mid_epoch: bool) -> dict[str, torch.Tensor]:
        """The states a resumed run's next iterator starts from: within an epoch, those the epoch began with (its
        iterator is made again and skips the trained batches); at an epoch's end, those as of the last step, from
        which the next epoch begins."""
        state, sampler = self.epoch_start if mid_epoch else self.at_step
        return {"state": state} if sampler is None else {"state": state, "sampler": sampler}

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint's `resume_state`."""
        self.state = saved["state"].clone()
        if self.sampler is not None and "sampler" in saved:
            self.sampler.set_state(saved["sampler"].clone())
        self.epoch_start = self.at_step = self._states()
