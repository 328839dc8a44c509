"""Peak-memory model of a training step (ASPEN, SPEC.md §3).

    Mem ≈ β0 + β1·Σ_i L_i + β2·Σ_i L_i²

over the rows i of the mixed batch, with L_i the (padded) row length: activations grow linearly with the tokens and
the attention scores quadratically with the length. β is fitted by least squares on a few profiling steps of
different shapes. What is measured:

- on CUDA: `torch.cuda.max_memory_allocated` during the step;
- on CPU (no allocator statistics): the bytes of the tensors autograd saves for backward during the forward
  (`activation_bytes`) plus the constant of weights and optimizer state — the part that changes with the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch


def shape_features(lengths: Sequence[int]) -> list[float]:
    """[1, Σ L, Σ L²] of a batch whose rows have lengths `lengths`."""
    return [1.0, float(sum(lengths)), float(sum(length * length for length in lengths))]


class MemoryModel:
    """Least-squares fit of peak step memory (bytes) against `shape_features`.

    Example:
        >>> m = MemoryModel()
        >>> for rows, length in [(1, 16), (2, 16), (1, 64), (4, 32)]:
        ...     m.observe([length] * rows, 1000 + 10 * rows * length + 0.5 * rows * length**2)
        >>> round(m.predict([48] * 2))
        4264
    """

    def __init__(self) -> None:
        self.samples: list[tuple[list[float], float]] = []
        self.beta: torch.Tensor | None = None

    def observe(self, lengths: Sequence[int], peak_bytes: float) -> None:
        self.samples.append((shape_features(lengths), float(peak_bytes)))
        self.beta = None

    @property
    def fitted(self) -> bool:
        return len({tuple(f) for f, _ in self.samples}) >= 3

    def fit(self) -> torch.Tensor:
        """β (3,) by least squares in float64 (features are scaled so that Σ L² does not swamp the rest)."""
        if not self.fitted:
            raise ValueError("the memory model needs samples of at least 3 different batch shapes to fit")
        x = torch.tensor([f for f, _ in self.samples], dtype=torch.float64)
        y = torch.tensor([v for _, v in self.samples], dtype=torch.float64)
        scale = x.abs().amax(0).clamp(min=1.0)
        solution = torch.linalg.lstsq(x / scale, y.unsqueeze(1)).solution.squeeze(1)
        self.beta = solution / scale
        return self.beta

    def fit_by_profiling(self, run_step, device: torch.device, vocab_size: int, max_length: int) -> torch.Tensor:
        """Observe five synthetic steps of growing shape, then fit. `run_step(ids)` runs forward + backward on
        (rows, length) random token ids; its peak is measured by `step_memory`."""
        longest = max(max_length, 8)
        for rows, length in [(1, longest // 4), (2, longest // 2), (1, longest), (2, longest), (4, longest // 2)]:
            ids = torch.randint(0, vocab_size, (rows, length), device=device)
            self.observe([length] * rows, step_memory(device, lambda ids=ids: run_step(ids)))
        return self.fit()

    def predict(self, lengths: Sequence[int]) -> float:
        beta = self.beta if self.beta is not None else self.fit()
        return float(torch.tensor(shape_features(lengths), dtype=torch.float64) @ beta)

    def relative_errors(self) -> list[float]:
        """|predicted − measured| / measured over the observed samples."""
        beta = self.beta if self.beta is not None else self.fit()
        out = []
        for features, value in self.samples:
            predicted = float(torch.tensor(features, dtype=torch.float64) @ beta)
            out.append(abs(predicted - value) / max(value, 1.0))
        return out


@contextmanager
def activation_bytes():
    """Count the bytes autograd saves for backward inside the block: `with activation_bytes() as meter: ...`,
    then `meter["bytes"]`. Tensors saved twice (same storage) count once."""
    meter = {"bytes": 0}
    seen: set[int] = set()

    def pack(tensor: torch.Tensor):
        try:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                meter["bytes"] += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some views)
            meter["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield meter


def step_memory(device: torch.device, run_step) -> float:
    """Peak bytes of `run_step()`: CUDA allocator peak on a GPU, else saved-activation bytes (see module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device))
    with activation_bytes() as meter:
        run_step()
    return float(meter["bytes"])
