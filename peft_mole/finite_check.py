"""Opt-in NaN/inf detection that names the layer: `with check_finite(model): model(**batch)`.

Off by default and off the hot path: without it the layers only test one boolean. With it, every peft-mole layer
checks its input, its router logits (before the softmax) and its output, and the first non-finite value raises
`FloatingPointError` naming the layer, the adapter and what was non-finite — where a NaN loss several layers later
says nothing about where it started.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def _context_of(model: nn.Module):
    for module in model.modules():
        context = getattr(module, "_context", None)
        if context is not None and hasattr(context, "check_finite"):
            return context
    raise ValueError("check_finite needs a model with peft-mole layers (MixLoRA, DynMoLE or a MultiJobModel)")


def raise_if_not_finite(tensor: torch.Tensor, where: str) -> None:
    if not torch.isfinite(tensor).all():
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        raise FloatingPointError(f"{where} holds {nan} NaN and {inf} inf values (shape {tuple(tensor.shape)})")


class check_finite:  # noqa: N801 — used like a function: `with check_finite(model): ...`
    """Turn the checks on for `model` (a context manager, or call `.remove()` to turn them off)."""

    def __init__(self, model: nn.Module) -> None:
        self.context = _context_of(model)
        # nested checks count: the inner one's end leaves the outer one's router checks on (they went off before)
        self.context.check_finite += 1
        self.active = True
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and getattr(module, "_context", None) is self.context:
                self.handles.append(module.register_forward_pre_hook(self._check_input(name)))
                self.handles.append(module.register_forward_hook(self._check_output(name)))

    @staticmethod
    def _check_input(name: str):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                raise_if_not_finite(args[0], f"the input of {name}")

        return hook

    @staticmethod
    def _check_output(name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                raise_if_not_finite(output, f"the output of {name}")

        return hook

    def remove(self) -> None:
        if self.active:  # (once: a second call changes nothing)
            self.active = False
            self.context.check_finite -= 1
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> check_finite:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
