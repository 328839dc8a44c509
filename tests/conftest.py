"""Shared fixtures. Tests never reach a hub: everything is built from configs or written to tmp dirs."""

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
def _fresh_compile_caches():
    """Each test compiles from scratch: code compiled for earlier tests' models would count towards dynamo's
    recompile limit (8 per code object), which `fullgraph=True` turns into an error."""
    yield
    torch._dynamo.reset()
