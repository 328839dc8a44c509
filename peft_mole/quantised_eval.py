"""Eval-mode calls that keep a 4-bit base trainable.

bitsandbytes' `Linear4bit` (0.50), on a CPU with AVX512-BF16, repacks its weight for an inference kernel the first
time it is called in eval mode on an input without autograd, and keeps it so: from then on, in training mode too,
its output has no gradient to its input. A training run that once evaluated, or an adapter whose creation probed
the block (`tuners.mixlora.block_check`), then silently trains every adapter before such a layer on the gradient
of the layers after the last 4-bit one only (the attention experts of a MixLoRA adapter: 34-60 % off, measured).
Its training mode changes nothing else in that layer (it has no dropout), so within `eval_keeping_4bit_training` a
model is in eval mode but its 4-bit linears, which then never repack (and on the CPU compute as in training, by
dequantising: slower than the inference kernel).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def is_4bit_linear(module: nn.Module) -> bool:
    """bitsandbytes' `Linear4bit` (its own weight parameter carries a `quant_state`), without importing
    bitsandbytes. Not a PEFT wrapper around one: its `weight` property returns the wrapped layer's, and a wrapper
    reads its training mode (router jitter, dropout), which eval must turn off."""
    return hasattr(module._parameters.get("weight"), "quant_state")


@contextmanager
def eval_keeping_4bit_training(model: nn.Module) -> Iterator[None]:
    """Within it, `model` is in eval mode except its 4-bit linears; after it, every module is in its mode before.

    The modes are restored flag by flag (a model may hold submodules in another mode), which bypasses `train()`, the
    call that empties DoRA's cached weight norms (PEFT's `_cache_clear`; MixDoRA's experts have one of the same name).
    So each module that returns to training has its cache emptied here: else an evaluation after optimizer steps
    (a training loop that set `train()` once) would score with the norms of the weights before them."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    for module in model.modules():
        module.training = is_4bit_linear(module)
    try:
        yield
    finally:
        for module, training in modes:  # each as it was (a model may hold submodules in another mode)
            if training and not module.training and callable(getattr(module, "_cache_clear", None)):
                module._cache_clear()
            module.training = training
