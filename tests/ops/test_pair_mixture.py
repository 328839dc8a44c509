"""Dispatched pairs in blocks: values and gradients equal plain autograd (gradcheck) at any block size, with and
without gate/up experts and dropout, an expert with no pairs and a token with none; nothing of size (M, I) is kept;
bad shapes are named."""

import pytest
import torch
from torch import nn

from peft_mole.ops import gated
from peft_mole.ops.experts import dispatch
from peft_mole.ops.pair_mixture import pair_gated_mixture
from tests.ops.mixture_cases import VARIANTS, as_function, leaves

E, N, INTER, R = 4, 6, 5, 2  # experts, tokens, intermediate size, rank


def inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=dtype, generator=gen)).requires_grad_()

    chosen = torch.tensor([[0, 2], [2, 0], [0, 1], [2, 0], [1, 0], [0, 2]])  # expert 3: no pairs
    weights = torch.rand(N, 2, dtype=dtype, generator=gen)
    weights[5] = 0.0  # token 5 has no pairs (unused slots are dropped)
    plan = dispatch(weights, chosen, E)
    m = len(plan.token)
    mask = (torch.rand(N, INTER, dtype=dtype, generator=gen) > 0.3).to(dtype) / 0.7
    return plan, dict(
        gate=leaf(N, INTER), up=leaf(N, INTER), weight=plan.weight.clone().requires_grad_(),
        down_a=leaf(E, R, INTER, scale=0.5), mask=mask,
        gate_lora=(leaf(m, R), leaf(E, INTER, R, scale=0.5)), up_lora=(leaf(m, R), leaf(E, INTER, R, scale=0.5)),
    )


def plain(plan, gate, up, weight, act_fn, down_a, mask=None, gate_lora=None, up_lora=None):
    def pairs(frozen, lora):
        out = frozen[plan.token]
        if lora is None:
            return out
        return out + torch.einsum("mr,mir->mi", lora[0], lora[1][plan.expert])

    weighted = weight.unsqueeze(-1) * act_fn(pairs(gate, gate_lora)) * pairs(up, up_lora)
    hidden = torch.zeros_like(gate).index_add(0, plan.token, weighted)
    down_input = weighted if mask is None else weighted * mask[plan.token]
    return hidden, torch.einsum("mi,mri->mr", down_input, down_a[plan.expert])


@pytest.mark.parametrize("act_fn", [nn.SiLU(), nn.GELU(approximate="tanh"), torch.relu], ids=["silu", "gelu", "relu"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("chunk", [INTER, 2 * INTER, 10**6], ids=["1_pair", "2_pairs", "1_block"])
def test_equals_plain_autograd_and_passes_gradcheck(act_fn, variant, chunk, monkeypatch):
    monkeypatch.setattr(gated, "CHUNK_ELEMENTS", chunk)
    plan, args = inputs()
    args = VARIANTS[variant](args)
    run = dict(token=plan.token, counts=plan.counts, act_fn=act_fn)
    hidden, z = pair_gated_mixture(**run, **args)
    ref_hidden, ref_z = plain(plan, act_fn=act_fn, **args)
    torch.testing.assert_close(hidden, ref_hidden)
    torch.testing.assert_close(z, ref_z)
    assert torch.equal(hidden[5], torch.zeros(INTER, dtype=hidden.dtype))  # a token without pairs
    gen = torch.Generator().manual_seed(1)
    grads = (torch.randn(N, INTER, dtype=torch.float64, generator=gen),
             torch.randn(len(plan.token), R, dtype=torch.float64, generator=gen))
    torch.testing.assert_close(
        torch.autograd.grad((hidden, z), leaves(args), grads),
        torch.autograd.grad((ref_hidden, ref_z), leaves(args), grads),
    )

    assert torch.autograd.gradcheck(as_function(pair_gated_mixture, args, **run), tuple(leaves(args)))


def test_in_place_activation_and_only_the_wanted_gradients(monkeypatch):
    monkeypatch.setattr(gated, "CHUNK_ELEMENTS", 2 * INTER)
    plan, args = inputs()
    z_gate, b_gate = args["gate_lora"]
    frozen = dict(args, weight=args["weight"].detach(), down_a=args["down_a"].detach(), gate_lora=(z_gate, b_gate.detach()))
    gate_before = args["gate"].detach().clone()
    hidden, z = pair_gated_mixture(token=plan.token, counts=plan.counts, act_fn=nn.SiLU(inplace=True), **frozen)
    ref_hidden, ref_z = plain(plan, act_fn=nn.functional.silu, **frozen)
    wanted = (args["gate"], args["up"], z_gate, *args["up_lora"])
    loss, ref_loss = hidden.square().sum() + z.sum(), ref_hidden.square().sum() + ref_z.sum()
    torch.testing.assert_close(torch.autograd.grad(loss, wanted), torch.autograd.grad(ref_loss, wanted))
    assert torch.equal(args["gate"].detach(), gate_before)  # the in-place σ never overwrote an input


def test_keeps_nothing_of_the_pairs_intermediate_size():
    plan, args = inputs(torch.float32)
    pairs_size = len(plan.token) * INTER
    sizes = []

    def saved(fn):
        sizes.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return [n for n in sizes if n >= pairs_size]

    assert saved(lambda: pair_gated_mixture(token=plan.token, counts=plan.counts, act_fn=nn.SiLU(), **args)) == []
    assert len(saved(lambda: plain(plan, act_fn=nn.functional.silu, **args))) >= 4


def test_under_cpu_autocast_the_products_stay_in_the_adapter_dtype():
    plan, args = inputs(torch.float32)
    args = {k: (tuple(t.detach() for t in v) if isinstance(v, tuple) else v.detach()) for k, v in args.items()}
    args16 = dict(args, gate=args["gate"].bfloat16(), up=args["up"].bfloat16())  # frozen outputs under autocast
    run = dict(token=plan.token, counts=plan.counts, act_fn=nn.SiLU())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, z = pair_gated_mixture(**run, **args16)
    plain_hidden, plain_z = pair_gated_mixture(**run, **args16)
    assert hidden.dtype == torch.bfloat16 and z.dtype == torch.float32
    assert torch.equal(hidden, plain_hidden) and torch.equal(z, plain_z)


def test_bad_shapes_are_named():
    plan, a = inputs()
    a = {k: (tuple(t.detach() for t in v) if isinstance(v, tuple) else v.detach()) for k, v in a.items()}
    act, m = nn.SiLU(), len(plan.token)
    with pytest.raises(ValueError, match=r"gate and up must both be \(N, I\), got \(6, 5\) and \(6, 4\)"):
        pair_gated_mixture(a["gate"], a["up"][:, :4], a["weight"], act, a["down_a"], plan.token, plan.counts)
    with pytest.raises(ValueError, match=rf"weight must be \(M,\) and counts sum to M = {m} pairs, got weight \(6,\)"):
        pair_gated_mixture(a["gate"], a["up"], a["weight"][:6], act, a["down_a"], plan.token, plan.counts)
    with pytest.raises(ValueError, match=r"down_a must be \(E, r, I\) with E=4, I=5, got \(4, 5, 2\)"):
        pair_gated_mixture(a["gate"], a["up"], a["weight"], act, a["down_a"].transpose(1, 2), plan.token, plan.counts)
    with pytest.raises(ValueError, match=r"mask must be \(N, I\) = \(6, 5\), got \(5, 6\)"):
        pair_gated_mixture(a["gate"], a["up"], a["weight"], act, a["down_a"], plan.token, plan.counts, a["mask"].t())
    z, b = a["up_lora"]
    with pytest.raises(ValueError, match=r"up_lora must be \(z \(M, r\), B \(E, I, r\)\)"):
        pair_gated_mixture(a["gate"], a["up"], a["weight"], act, a["down_a"], plan.token, plan.counts,
                           up_lora=(z, b.transpose(1, 2)))
