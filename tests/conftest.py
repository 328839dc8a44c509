"""Shared fixtures. Tests never reach a hub: everything is built from configs or written to tmp dirs."""

import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _leftovers_frozen():
    """After each test, what it left alive is frozen out of the garbage collector's scans (`gc.freeze`, after a
    collection of its cycles): the imports and what compiled tests leave in torch's caches (~200k objects after a
    few) made every later full collection slow, and training tests that make many objects ran up to 2x slower in a
    worker that had run compiled tests before them (4 test files: 118 s, 84 s with the freeze). Frozen objects are
    never collected: the module fixtures alive at the freeze keep their cycles until the worker ends (the suite's
    peak memory: 1.6 GB a worker)."""
    yield
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _fresh_compile_caches(_leftovers_frozen):
    """Each test compiles from scratch: code compiled for earlier tests' models would count towards dynamo's
    recompile limit (8 per code object), which `fullgraph=True` turns into an error. (Reset before the freeze.)"""
    yield
    torch._dynamo.reset()

