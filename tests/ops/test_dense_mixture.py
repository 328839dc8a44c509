"""Every expert on every token in blocks: values and gradients equal plain autograd (gradcheck), at any block size,
for only the wanted inputs; it keeps g and u only; bad shapes are named."""

import pytest
import torch
from torch import nn

from peft_mole.ops import dense_mixture
from peft_mole.ops.dense_mixture import dense_gated_mixture

E, N, INTER, R = 3, 7, 5, 2  # experts, tokens, intermediate size, rank


def inputs(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(E, N, INTER, dtype=dtype, generator=gen, requires_grad=True)
    up = torch.randn(E, N, INTER, dtype=dtype, generator=gen, requires_grad=True)
    weight = torch.rand(E, N, 1, dtype=dtype, generator=gen)
    weight[0, 2] = 0.0  # an unselected pair
    weight.requires_grad_()
    down_a = torch.randn(E, R, INTER, dtype=dtype, generator=gen, requires_grad=True)
    mask = (torch.rand(N, INTER, dtype=dtype, generator=gen) > 0.3).to(dtype) / 0.7
    return gate, up, weight, down_a, mask


def plain(gate, up, weight, act_fn, down_a, mask=None):
    weighted = weight * act_fn(gate) * up
    down_input = weighted if mask is None else weighted * mask
    return weighted.sum(0), torch.bmm(down_input, down_a.transpose(1, 2))


@pytest.mark.parametrize("act_fn", [nn.SiLU(), nn.GELU(approximate="tanh"), torch.relu], ids=["silu", "gelu", "relu"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["dropout", "no_dropout"])
@pytest.mark.parametrize("block_elements", [E * INTER, 2 * E * INTER, 10**6], ids=["1_token", "2_tokens", "one_block"])
def test_equals_plain_autograd_and_passes_gradcheck(act_fn, with_mask, block_elements, monkeypatch):
    monkeypatch.setattr(dense_mixture, "BLOCK_ELEMENTS", block_elements)
    gate, up, weight, down_a, mask = inputs()
    mask = mask if with_mask else None
    hidden, z = dense_gated_mixture(gate, up, weight, act_fn, down_a, mask)
    ref_hidden, ref_z = plain(gate, up, weight, act_fn, down_a, mask)
    torch.testing.assert_close(hidden, ref_hidden)
    torch.testing.assert_close(z, ref_z)
    gen = torch.Generator().manual_seed(1)
    grads = (torch.randn(N, INTER, dtype=gate.dtype, generator=gen), torch.randn(E, N, R, dtype=gate.dtype, generator=gen))
    leaves = (gate, up, weight, down_a)
    torch.testing.assert_close(
        torch.autograd.grad((hidden, z), leaves, grads), torch.autograd.grad((ref_hidden, ref_z), leaves, grads)
    )
    assert torch.autograd.gradcheck(
        lambda g, u, w, a: dense_gated_mixture(g, u, w, act_fn, a, mask), leaves
    )


def test_expanded_inputs_in_place_activation_and_only_the_wanted_gradients(monkeypatch):
    monkeypatch.setattr(dense_mixture, "BLOCK_ELEMENTS", 2 * E * INTER)
    gate, up, weight, down_a, mask = inputs()
    gate_per_token = gate[0].detach().clone().requires_grad_()  # no gate experts: W1 x expanded over experts
    expanded = gate_per_token.unsqueeze(0).expand(E, -1, -1)
    frozen_weight, frozen_a = weight.detach(), down_a.detach()
    hidden, z = dense_gated_mixture(expanded, up, frozen_weight, nn.SiLU(inplace=True), frozen_a, mask)
    ref_hidden, ref_z = plain(expanded, up, frozen_weight, nn.functional.silu, frozen_a, mask)
    loss, ref_loss = hidden.square().sum() + z.sum(), ref_hidden.square().sum() + ref_z.sum()
    torch.testing.assert_close(
        torch.autograd.grad(loss, (gate_per_token, up)), torch.autograd.grad(ref_loss, (gate_per_token, up))
    )
    assert torch.equal(gate_per_token, gate[0].detach())  # the in-place σ never overwrote the saved gate


def test_keeps_only_gate_and_up_of_the_expert_token_size():
    gate, up, weight, down_a, mask = (t.float().detach().requires_grad_(t.requires_grad) for t in inputs())
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        dense_gated_mixture(gate, up, weight, nn.SiLU(), down_a, mask)
    big = [n for n in sizes if n >= E * N * INTER]
    assert big == [E * N * INTER, E * N * INTER]  # g and u; weight, A2 and the (N, INTER) mask are smaller
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        plain(gate, up, weight, nn.functional.silu, down_a, mask)
    assert len([n for n in sizes if n >= E * N * INTER]) >= 4


def test_under_cpu_autocast_the_products_stay_in_the_adapter_dtype():
    gate, up, weight, down_a, mask = (t.float().detach() for t in inputs())
    gate16, up16 = gate.bfloat16(), up.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, z = dense_gated_mixture(gate16, up16, weight, nn.SiLU(), down_a, mask)
    plain_hidden, plain_z = dense_gated_mixture(gate16, up16, weight, nn.SiLU(), down_a, mask)
    assert hidden.dtype == torch.bfloat16 and z.dtype == torch.float32
    assert torch.equal(hidden, plain_hidden) and torch.equal(z, plain_z)


def test_bad_shapes_are_named():
    gate, up, weight, down_a, mask = (t.detach() for t in inputs())
    act = nn.SiLU()
    with pytest.raises(ValueError, match=r"gate and up must both be \(E, N, I\), got \(3, 7, 5\) and \(3, 7, 4\)"):
        dense_gated_mixture(gate, up[..., :4], weight, act, down_a)
    with pytest.raises(ValueError, match=r"weight must be \(E, N, 1\) = \(3, 7, 1\), got \(7, 3\)"):
        dense_gated_mixture(gate, up, weight[..., 0].t(), act, down_a)
    with pytest.raises(ValueError, match=r"down_a must be \(E, r, I\) with E=3, I=5, got \(3, 5, 2\)"):
        dense_gated_mixture(gate, up, weight, act, down_a.transpose(1, 2))
    with pytest.raises(ValueError, match=r"mask must be \(N, I\) = \(7, 5\), got \(5, 7\)"):
        dense_gated_mixture(gate, up, weight, act, down_a, mask.t())
