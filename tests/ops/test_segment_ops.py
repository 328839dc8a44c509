"""`segment_linear`: per-expert products over expert-sorted rows with the segment ends on the device, as one
operator that torch.compile keeps whole (ops/segment_ops.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_mole.ops.segment_ops import segment_linear, segment_weight_grad
from peft_mole.ops.segmented_lora import _grouped_mm_runs_on_cpu, grouped_mm_serves


def per_segment(rows, weight, counts):
    return torch.cat([F.linear(seg, weight[e]) for e, seg in enumerate(rows.split(counts)) if seg.shape[0]])


@pytest.mark.parametrize("counts", [[5, 0, 8], [0, 12, 0], [4, 4, 4]], ids=["empty_middle", "one_expert", "even"])
@pytest.mark.parametrize("width", [16, 5], ids=["grouped_mm", "loop"])  # 5 floats break grouped_mm's stride rule
def test_segment_linear_matches_per_segment_linear_and_its_gradients(counts, width):
    assert grouped_mm_serves(torch.device("cpu"), torch.float32, 8, width) == (width == 16 and _grouped_mm_runs_on_cpu(
        torch.float32))  # the ids say which branch runs (the grouped one only where this torch has it on the CPU)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(sum(counts), width, generator=gen, requires_grad=True)
    weight = torch.randn(3, 8, width, generator=gen, requires_grad=True)
    ends = torch.tensor(counts).cumsum(0)
    out = segment_linear(rows, weight, ends)
    expected = per_segment(rows, weight, counts)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (rows, weight), grad)
    want = torch.autograd.grad(expected, (rows, weight), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    for e, count in enumerate(counts):
        if count == 0:
            assert got[1][e].abs().sum() == 0  # an expert without rows gets a zero gradient, not garbage


def test_segment_operators_pass_torch_library_opcheck():
    """Schema, fake (meta) implementation, autograd registration and tracing agree with the real kernels."""
    gen = torch.Generator().manual_seed(1)
    rows, weight = torch.randn(9, 16, generator=gen, requires_grad=True), torch.randn(2, 4, 16, generator=gen)
    ends = torch.tensor([3, 9])
    torch.library.opcheck(segment_linear, (rows, weight.requires_grad_(), ends))
    torch.library.opcheck(segment_weight_grad, (torch.randn(9, 4, generator=gen), rows.detach(), ends, 2))


def test_segment_linear_compiles_into_one_graph_with_ends_computed_in_the_graph():
    """The ends come from the routing inside the graph (no host read); fullgraph=True raises on any break."""
    gen = torch.Generator().manual_seed(2)
    rows, weight = torch.randn(10, 16, generator=gen, requires_grad=True), torch.randn(4, 8, 16, generator=gen)
    experts = torch.tensor([3, 0, 3, 1, 0, 3, 3, 1, 0, 3])

    def step(rows, weight, experts):
        order = torch.argsort(experts, stable=True)
        ends = torch.searchsorted(experts[order], torch.arange(4), right=True)
        return segment_linear(rows[order], weight, ends)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(rows, weight, experts)
    eager = step(rows, weight, experts)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    (got,) = torch.autograd.grad(out.square().sum(), rows)
    (want,) = torch.autograd.grad(eager.square().sum(), rows)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_operators_that_read_back_or_draw_from_job_generators_are_kept_out_of_cuda_graphs():
    """A CUDA graph (`torch.compile(mode="reduce-overhead")`) captures neither a host read-back nor a draw from a
    job's own generator: the operators that do either are tagged `cudagraph_unsafe`, so Inductor splits the graph
    around them (before 2026-12-07 the compiled multi-job step with dropout would have failed in capture)."""
    import peft_mole.ops.dropout  # noqa: F401  (registers the operators)
    import peft_mole.ops.job_streams  # noqa: F401
    import peft_mole.packed_attention_op  # noqa: F401

    for name in ("segment_linear", "segment_weight_grad", "keep_mask", "per_job_keep_mask", "per_job_jitter",
                 "packed_sdpa", "packed_sdpa_backward"):
        assert torch.Tag.cudagraph_unsafe in getattr(torch.ops.peft_mole, name).default.tags, name
