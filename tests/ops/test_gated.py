"""The weighted gated activation w ⊙ σ(g) ⊙ u: values, gradients (gradcheck), saved memory, bad input."""

import functools

import pytest
import torch
from torch import nn

from peft_mole.ops import gated
from peft_mole.ops.gated import weighted_gated_activation


@pytest.fixture(params=["one_block", "blocks_of_2_rows"])
def blocks(request, monkeypatch):
    """Run a test with the default block size (these tensors fit one block) and with blocks of 2 rows of 5."""
    if request.param == "blocks_of_2_rows":
        monkeypatch.setattr(gated, "CHUNK_ELEMENTS", 10)
    return request.param


@pytest.mark.parametrize("act_fn", [nn.SiLU(), nn.GELU(approximate="tanh"), torch.relu], ids=["silu", "gelu", "relu"])
@pytest.mark.parametrize("weight_shape", [(6, 1), (2, 3, 1)], ids=["per_pair", "expert_major"])
def test_equals_plain_autograd_and_passes_gradcheck(act_fn, weight_shape, blocks):
    gen = torch.Generator().manual_seed(0)
    shape = (*weight_shape[:-1], 5)
    gate = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    up = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.rand(weight_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    out = weighted_gated_activation(gate, up, weight, act_fn)
    ref = weight * act_fn(gate) * up
    torch.testing.assert_close(out, ref)
    grad = torch.randn(shape, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(
        torch.autograd.grad(out, (gate, up, weight), grad), torch.autograd.grad(ref, (gate, up, weight), grad)
    )
    assert torch.autograd.gradcheck(lambda g, u, w: weighted_gated_activation(g, u, w, act_fn), (gate, up, weight))


def test_an_up_broadcast_over_experts_and_a_constant_weight_get_the_right_gradients():
    gen = torch.Generator().manual_seed(1)
    gate = torch.randn(3, 4, 5, generator=gen, requires_grad=True)
    up_per_token = torch.randn(4, 5, generator=gen, requires_grad=True)  # no up experts: the frozen W3 x
    weight = torch.rand(3, 4, 1, generator=gen)  # no gradient wanted
    out = weighted_gated_activation(gate, up_per_token.unsqueeze(0).expand(3, -1, -1), weight, nn.SiLU())
    ref = weight * nn.functional.silu(gate) * up_per_token
    grads = torch.autograd.grad(out.sum(), (gate, up_per_token))
    torch.testing.assert_close(grads, torch.autograd.grad(ref.sum(), (gate, up_per_token)))


@pytest.mark.parametrize("act_fn", [nn.SiLU(inplace=True), nn.Identity(), lambda t: t.view(t.shape)],
                         ids=["in_place", "identity", "view"])
def test_activations_that_return_or_overwrite_their_input_leave_the_saved_gate_intact(act_fn):
    gen = torch.Generator().manual_seed(2)
    gate_per_token = torch.randn(4, 5, generator=gen, requires_grad=True)
    gate = gate_per_token.unsqueeze(0).expand(3, -1, -1)  # no gate experts on the dense path: an expanded view
    up = torch.randn(3, 4, 5, generator=gen, requires_grad=True)
    weight = torch.rand(4, 1, generator=gen, requires_grad=True)  # lower rank than gate: broadcast
    out = weighted_gated_activation(gate, up, weight, act_fn)
    plain = nn.functional.silu if isinstance(act_fn, nn.SiLU) else (lambda t: t)
    ref = weight * plain(gate_per_token) * up
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), (gate_per_token, up, weight))
    torch.testing.assert_close(grads, torch.autograd.grad(ref.square().sum(), (gate_per_token, up, weight)))


def test_keeps_two_tensors_of_the_pair_size_for_backward_where_autograd_keeps_four():
    def saved_bytes(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            fn()
        return sum(sizes)

    gate, up = torch.randn(64, 100, requires_grad=True), torch.randn(64, 100, requires_grad=True)
    weight = torch.rand(64, 1, requires_grad=True)
    pair_bytes = gate.numel() * 4
    ours = saved_bytes(lambda: weighted_gated_activation(gate, up, weight, nn.SiLU()))
    plain = saved_bytes(lambda: nn.functional.silu(gate) * up * weight)
    assert ours < 2 * pair_bytes + 1024 and plain >= 4 * pair_bytes


def test_without_gradients_it_is_the_plain_formula_and_bad_shapes_are_named():
    gate, up, weight = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4, 1)
    assert torch.equal(weighted_gated_activation(gate, up, weight, torch.relu), torch.relu(gate) * up * weight)
    with pytest.raises(ValueError, match=r"gate and up must have the same shape, got \(4, 3\) and \(4, 2\)"):
        weighted_gated_activation(gate, up[:, :2], weight, torch.relu)
    with pytest.raises(ValueError, match=r"weight of shape \(2, 4, 1\) must broadcast to the gate's \(4, 3\)"):
        weighted_gated_activation(gate, up, torch.rand(2, 4, 1), torch.relu)


@pytest.mark.parametrize(
    "act_fn",
    [nn.SiLU(), nn.SiLU(inplace=True), functools.partial(nn.functional.silu, inplace=True), nn.GELU(), nn.Identity(),
     lambda t: t.view(t.shape)],
    ids=["silu", "silu_in_place", "partial_in_place", "gelu", "identity", "view"],
)
def test_blocks_of_any_size_give_the_one_block_values_and_only_the_wanted_gradients(act_fn, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    gate, up = torch.randn(2, 7, 6, generator=gen), torch.randn(2, 7, 6, generator=gen)  # 14 rows: a partial block
    weight, grad = torch.rand(2, 7, 1, generator=gen), torch.randn(2, 7, 6, generator=gen)

    def run(wanted):
        leaves = [t.clone().requires_grad_(name in wanted) for name, t in zip("guw", (gate, up, weight), strict=True)]
        out = weighted_gated_activation(*leaves, act_fn)
        out.backward(grad)
        assert torch.equal(leaves[0].detach(), gate)  # the saved gate was not overwritten (in-place σ)
        return out.detach(), [leaf.grad for leaf in leaves]

    reference = run("guw")
    assert reference[0].shape == gate.shape and all(g is not None for g in reference[1])
    for elements in (6, 18, 30, 10**6):  # 1, 3, 5 rows per block; one block
        monkeypatch.setattr(gated, "CHUNK_ELEMENTS", elements)
        for wanted in ("guw", "g", "u", "w"):
            out, grads = run(wanted)
            torch.testing.assert_close(out, reference[0], rtol=0, atol=0)
            for name, got, expected in zip("guw", grads, reference[1], strict=True):
                if name in wanted:
                    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
                else:
                    assert got is None


def test_zero_rows_give_empty_results_and_gradients():
    gate, up = torch.randn(0, 5, requires_grad=True), torch.randn(0, 5, requires_grad=True)
    weight = torch.rand(0, 1, requires_grad=True)
    out = weighted_gated_activation(gate, up, weight, nn.SiLU())
    assert out.shape == (0, 5)
    grads = torch.autograd.grad(out.sum(), (gate, up, weight))
    assert [tuple(g.shape) for g in grads] == [(0, 5), (0, 5), (0, 1)]


def test_blocks_are_cache_sized_on_the_cpu_and_few_on_a_gpu():
    """The medium shape's pair chain (I = 5632, 8192 pairs a layer): CPU-sized blocks would be ~180 a layer, each a
    dozen kernel launches on a GPU; there the blocks hold 2^24 values. A device object needs no CUDA to build."""
    from peft_mole.ops.dense_mixture import BLOCK_ELEMENTS, _token_blocks
    from peft_mole.ops.pair_mixture import _pair_blocks

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert gated.block_elements(cpu, gated.CHUNK_ELEMENTS) == gated.CHUNK_ELEMENTS
    assert gated.block_elements(cuda, gated.CHUNK_ELEMENTS) == gated.ACCELERATOR_BLOCK_ELEMENTS
    assert gated.block_elements(cuda, 1 << 30) == 1 << 30  # never smaller than the CPU's
    counts = [1000, 0, 1048, 1024, 1024, 1024, 1024, 1024, 1024]
    cpu_blocks, cuda_blocks = _pair_blocks(counts, 5632, cpu), _pair_blocks(counts, 5632, cuda)
    assert len(cpu_blocks) == -(-8192 // 46) and len(cuda_blocks) == 3  # 46 rows a block on CPU, 2978 on a GPU
    for blocks in (cpu_blocks, cuda_blocks):  # either way the segments tile every expert's rows exactly once
        covered = {e: [] for e in range(len(counts))}
        for rows, segments in blocks:
            assert [r for _, local in segments for r in range(local.start, local.stop)] == list(range(rows.stop - rows.start))
            for e, local in segments:
                covered[e] += range(rows.start + local.start, rows.start + local.stop)
        bounds = [sum(counts[:e]) for e in range(len(counts) + 1)]
        assert covered == {e: list(range(bounds[e], bounds[e + 1])) for e in range(len(counts))}
    assert [e for e, _ in cuda_blocks[0][1]] == [0, 2, 3]  # a block spans experts; the empty expert 1 has no segment
    assert len(_token_blocks(8, 4096, 5632, cpu)) == 4096 // (BLOCK_ELEMENTS // (8 * 5632)) + 1
    assert len(_token_blocks(8, 4096, 5632, cuda)) == 12
    assert len(gated._blocks(8192, 5632, cuda)) == 3


def test_silu_is_recognised_by_contract_only():
    """SiLU's derivative kernel serves F.silu, nn.SiLU and transformers' SiLUActivation (Llama's `act_fn` since
    transformers 5); not a subclass, which may compute something else, nor another activation."""
    from transformers.activations import ACT2FN

    class Scaled(nn.SiLU):
        def forward(self, x):
            return 2 * super().forward(x)

    assert gated.is_plain_silu(ACT2FN["silu"]) and gated.is_plain_silu(nn.SiLU(inplace=True))
    assert gated.is_plain_silu(nn.functional.silu)
    assert not gated.is_plain_silu(Scaled()) and not gated.is_plain_silu(ACT2FN["gelu"])
    assert not gated.is_plain_silu(torch.sigmoid)
