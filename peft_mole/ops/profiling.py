"""Named ranges for torch.profiler, so a profile groups time by concept (router, dispatch, experts)."""

from __future__ import annotations

import functools

import torch


def profiled(name: str):
    """Decorator: run the function inside `torch.profiler.record_function(name)` (µs overhead per call)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)

        return inner

    return wrap
