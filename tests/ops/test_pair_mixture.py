"""Dispatched pairs in blocks: values and gradients equal plain autograd (gradcheck) at any block size, with and
without gate/up experts and dropout, an expert with no pairs and a token with none; nothing of size (M, I) is kept;
bad shapes are named."""

import pytest
import torch
from torch import nn

from peft_mole.ops import gated, pair_mixture
from peft_mole.ops.experts import dispatch
from peft_mole.ops.pair_mixture import _pair_outputs, _Segments, pair_gated_mixture
from tests.ops.mixture_cases import VARIANTS, as_function, leaves

E, N, INTER, R = 4, 6, 5, 2  # experts, tokens, intermediate size, rank


def inputs(dtype=torch.float64, inter=INTER, rank=R):
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=dtype, generator=gen)).requires_grad_()

    chosen = torch.tensor([[0, 2], [2, 0], [0, 1], [2, 0], [1, 0], [0, 2]])  # expert 3: no pairs
    weights = torch.rand(N, 2, dtype=dtype, generator=gen)
    weights[5] = 0.0  # token 5 has no pairs (unused slots are dropped)
    plan = dispatch(weights, chosen, E)
    m = len(plan.token)
    mask = (torch.rand(N, inter, dtype=dtype, generator=gen) > 0.3).to(dtype) / 0.7
    return plan, dict(
        gate=leaf(N, inter), up=leaf(N, inter), weight=plan.weight.clone().requires_grad_(),
        down_a=leaf(E, rank, inter, scale=0.5), mask=mask,
        gate_lora=(leaf(m, rank), leaf(E, inter, rank, scale=0.5)),
        up_lora=(leaf(m, rank), leaf(E, inter, rank, scale=0.5)),
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


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("pairs_per_block", [1, 3, 100], ids=["1_pair", "3_pairs", "1_block"])
def test_grouped_products_equal_the_per_expert_loop(variant, pairs_per_block, monkeypatch):
    """float32 with sizes of 16-byte multiples: the per-expert products of each block run as `torch._grouped_mm`
    (blocks spanning experts, an expert with no pairs); values and gradients equal the loop's and plain autograd's."""
    from peft_mole.ops import pair_mixture

    inter, rank = 8, 4
    monkeypatch.setattr(gated, "CHUNK_ELEMENTS", pairs_per_block * inter)
    monkeypatch.setattr(pair_mixture, "GROUPED_MIN_SEGMENTS", 1)  # every block grouped, whatever its segments
    grouped_calls = []
    real_grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: grouped_calls.append(1) or real_grouped_mm(*a, **k))
    results = {}
    for path in ("grouped", "loop"):
        if path == "loop":
            monkeypatch.setattr(pair_mixture, "grouped_mm_serves", lambda *a: False)
        plan, args = inputs(torch.float32, inter, rank)
        args = VARIANTS[variant](args)
        run = dict(token=plan.token, counts=plan.counts, act_fn=nn.SiLU())
        calls_before = len(grouped_calls)
        outputs = pair_gated_mixture(**run, **args)
        gen = torch.Generator().manual_seed(1)
        grads = tuple(torch.randn(o.shape, generator=gen) for o in outputs)
        results[path] = (outputs, torch.autograd.grad(outputs, leaves(args), grads))
        assert (len(grouped_calls) > calls_before) == (path == "grouped")
    reference = plain(plan, act_fn=nn.SiLU(), **args)
    for got, want in zip(results["grouped"][0], reference, strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(results["grouped"], results["loop"], strict=True):
        torch.testing.assert_close(got, want)


def test_grouped_backward_takes_an_expanded_gradient(monkeypatch):
    """The gradient of `z.sum()` is expanded (stride 0), which `torch._grouped_mm` refuses: the backward makes it
    dense first (it raised "Invalid strides/sizes"); the same gradients as a dense one."""
    inter, rank = 8, 4
    monkeypatch.setattr(pair_mixture, "GROUPED_MIN_SEGMENTS", 1)
    plan, args = inputs(torch.float32, inter, rank)
    run = dict(token=plan.token, counts=plan.counts, act_fn=nn.SiLU())
    expanded = torch.autograd.grad(pair_gated_mixture(**run, **args)[1].sum(), leaves(args))
    hidden, z = pair_gated_mixture(**run, **args)
    dense = torch.autograd.grad((z * torch.ones_like(z)).sum(), leaves(args))
    for got, want in zip(expanded, dense, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_blocks_of_few_expert_segments_loop():
    from peft_mole.ops import pair_mixture

    cpu, counts = torch.device("cpu"), [2, 1, 1, 8]

    def grouped(width):  # which blocks run grouped products; a block holds 2^18 // width pairs
        blocks = pair_mixture._pair_blocks(counts, width, cpu)
        return [s.ends is not None for s in pair_mixture._block_segments(blocks, 4, [4], torch.float32, cpu)]

    assert grouped(4) == [True]  # one block, 4 expert segments
    assert grouped(2**18 // 4) == [True, False, False]  # blocks of 4 pairs: 3, 1 and 1 segments
    assert not any(grouped(2**18))  # one pair per block


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


@pytest.mark.parametrize("in_place", [False, True], ids=["cast", "in_place"])
@pytest.mark.parametrize("grouped", [False, True], ids=["loop", "grouped"])
def test_bf16_frozen_outputs_with_fp32_adapters_are_rounded_once(grouped, in_place, monkeypatch):
    """A bf16 base with fp32 adapters (PEFT's default), no autocast: each pair's frozen[t] + B_e z_p is summed in fp32
    and rounded once to bf16, whether through fp32 copies of the frozen rows (the CPU) or in place (off the CPU,
    forced here); by a loop of per-expert products and by one grouped product (`ends`: each expert's segment end)."""
    monkeypatch.setattr(pair_mixture, "_sums_in_place", lambda gathered, compute_dtype: in_place)
    inter, rank = 8, 4  # a grouped product needs rows of a multiple of 16 bytes
    gen = torch.Generator().manual_seed(0)
    frozen = torch.randn(N, inter, generator=gen).bfloat16()
    tokens, counts = torch.tensor([0, 3, 5, 1, 1, 4, 2]), [3, 0, 4]  # expert 1: no pairs
    z, lora_b = torch.randn(7, rank, generator=gen), torch.randn(3, inter, rank, generator=gen)
    ends = torch.tensor([3, 3, 7], dtype=torch.int32) if grouped else None
    segments, before = _Segments([(0, slice(0, 3)), (2, slice(3, 7))], ends), frozen.clone()
    got = _pair_outputs(frozen, tokens, z, lora_b, segments, torch.float32)
    expert = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    want = (frozen[tokens].float() + torch.einsum("pr,pir->pi", z, lora_b[expert])).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(frozen, before)  # the sums go into a gathered copy: the frozen outputs are unchanged


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
