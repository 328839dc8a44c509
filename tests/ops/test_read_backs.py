"""Values read back to the host in a training step (each a stream sync on CUDA, which stalls the kernel queue of a
launch-bound GPU step, docs/gpu.md "GPU: second run"), counted on the CPU by the operators that read back on
CUDA: a MixLoRA layer reads back twice (the dispatch's expert counts, the router record's real rows)."""

from __future__ import annotations

import traceback

import pytest
import torch
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import batch, dynmole, mixlora, tiny_base

READS_BACK = {"nonzero", "_local_scalar_dense", "bincount", "masked_select", "unique", "_unique2", "unique_dim"}


class _ReadBacks(TorchDispatchMode):
    """Counts the operators of READS_BACK whose innermost caller among peft_mole, PEFT and transformers is peft_mole
    (transformers' own, such as its causal-mask check, are not ours to remove)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        index_by_mask = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if name in READS_BACK or index_by_mask:
            callers = [f for f in traceback.extract_stack()
                       if any(part in f.filename for part in ("peft_mole/", "transformers/", "/peft/"))]
            if callers and "peft_mole/" in callers[-1].filename:
                self.sites.append(f"{callers[-1].name}:{name}")
        return func(*args, **(kwargs or {}))


def _read_backs(config, pad_last: int = 0, layers: int = 2) -> list[str]:
    """The read-back sites of one steady training forward and backward (a first step runs one-off probes)."""
    model = get_peft_model(tiny_base(num_hidden_layers=layers), config)
    ids, mask, labels = batch(3, 16, pad_last=pad_last)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    with _ReadBacks() as reads:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return sorted(reads.sites)


@pytest.mark.parametrize("pad_last", [0, 3], ids=["no_padding", "padding"])
def test_a_mixlora_layer_reads_back_twice_per_training_step(pad_last):
    assert _read_backs(mixlora(), pad_last) == sorted(["dispatch:bincount", "counted:nonzero"] * 2)


def test_dynmole_at_init_reads_back_only_its_router_records_rows():
    """At init every layer runs the dense chain (no dispatch); its dense choice is one `.tolist()` per layer, which
    the CPU does not dispatch as an operator (the old `int(selected.sum())` showed as `_local_scalar_dense`)."""
    assert _read_backs(dynmole()) == ["counted:nonzero"] * 2
