"""`sdpa_packed` on CUDA: a packed row's chunks against SDPA over the masked row on CUDA, and against the CPU.
Skipped without a CUDA device (CI has none)."""

from __future__ import annotations

import pytest
import torch

from peft_mole import PACKED_SDPA
from tests.helpers import tiny_base
from tests.test_packed_attention import packed_batch, with_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_packed_rows_on_cuda_equal_the_masked_row(dtype, tolerance):
    batch, _ = packed_batch()
    # the sequences' ends stay on the host, as a collator leaves them where nothing moves them: the chunks' masks
    # are made on the queries' device
    on_cuda = {k: v.cuda() if torch.is_tensor(v) and not k.startswith("cu_seq_lens") else v for k, v in batch.items()}
    reference = tiny_base().to("cuda", dtype)
    packed = with_attention(tiny_base(), PACKED_SDPA).to("cuda", dtype)
    got = packed(**on_cuda, use_cache=False)
    want = reference(**on_cuda, use_cache=False)
    torch.testing.assert_close(got.logits.float(), want.logits.float(), atol=tolerance, rtol=tolerance)
    got.loss.backward()
    want.loss.backward()
    for a, b in zip(packed.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tolerance, rtol=tolerance)
    if dtype == torch.float32:
        on_cpu = with_attention(tiny_base(), PACKED_SDPA)(**batch, use_cache=False).logits
        torch.testing.assert_close(got.logits.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


def test_the_compiled_operator_on_cuda_recomputes_its_chunks_with_the_eager_gradients(monkeypatch):
    """On CUDA the operator keeps no statistics (`keeps_statistics`): inductor's graph calls it, and its backward
    runs the chunks again; the values and gradients equal the eager chunks' under autograd."""
    from peft_mole.packed_attention_op import keeps_statistics
    from tests.test_packed_attention import sdpa_calls

    assert not keeps_statistics(torch.device("cuda"))
    torch._dynamo.reset()
    batch, _ = packed_batch()
    on_cuda = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items() if not k.startswith("max_length")}
    model = with_attention(tiny_base(), PACKED_SDPA).cuda()
    results = []
    for run in (model, torch.compile(model, backend="inductor", dynamic=True)):
        out = run(**on_cuda, use_cache=False)
        out.loss.backward()
        results.append((out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    calls = sdpa_calls(monkeypatch)  # the compiled step again: its operator runs the chunks, forward and backward
    compiled_step = torch.compile(model, backend="inductor", dynamic=True)
    compiled_step(**on_cuda, use_cache=False).loss.backward()
    model.zero_grad()
    tokens = on_cuda["input_ids"].shape[1]
    assert calls and max(calls) < tokens and len(calls) % 2 == 0, calls  # (not the masked row of all tokens)
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
