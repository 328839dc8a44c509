"""A job's flat optimizer tensors on CUDA (`multijob.flat_parameters`): fused and foreach AdamW over them move
every weight as the per-tensor optimizer does. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_mole.multijob.flat_parameters import job_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("fused", [True, False])  # False: foreach, flattened on an accelerator too
def test_flat_adamw_on_cuda_equals_per_tensor(fused):
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 16), (16, 64), (7,), (33, 5)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    reference = [nn.Parameter(t.cuda()) for t in start]
    flattened = [nn.Parameter(t.cuda()) for t in start]
    per_tensor = torch.optim.AdamW(reference, lr=0.1, fused=fused, foreach=None if fused else True)
    optimizer, flat = job_optimizer(torch.optim.AdamW, {"lr": 0.1, "fused": fused}, [{"params": flattened}],
                                    torch.device("cuda"))
    assert flat is not None
    for step in range(3):
        grads = [torch.randn(s, generator=torch.Generator().manual_seed(10 + step)).cuda() for s in shapes]
        for p, g in zip(reference, grads, strict=True):
            p.grad = g.clone()
        flat.add_gradients(flattened, grads)
        for opt in (per_tensor, optimizer):
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p, q, s in zip(reference, flattened, start, strict=True):
        assert not torch.equal(q.cpu(), s)
        torch.testing.assert_close(q, p, rtol=2e-7, atol=0)
