"""Every expert on every token in blocks: values and gradients equal plain autograd (gradcheck), at any block size,
with and without gate/up experts and dropout; only the wanted gradients; nothing of size (E, N, I) is kept; bad
shapes are named."""

import pytest
import torch
from torch import nn

from peft_mole.ops import dense_mixture
from peft_mole.ops.dense_mixture import dense_gated_mixture
from tests.ops.mixture_cases import VARIANTS, as_function, dense_inputs, leaves

E, N, INTER, R = 3, 7, 5, 2  # experts, tokens, intermediate size, rank
SCALE = 1.5


def inputs(dtype=torch.float64, seed=0):
    return dense_inputs(E, N, INTER, R, dtype, seed)


def plain(gate, up, weight, act_fn, down_a, mask=None, gate_lora=None, up_lora=None, scaling=1.0):
    def pairs(frozen, lora):
        expanded = frozen.unsqueeze(0).expand(E, -1, -1)
        return expanded if lora is None else expanded + scaling * torch.bmm(lora[0], lora[1].transpose(1, 2))

    weighted = weight * act_fn(pairs(gate, gate_lora)) * pairs(up, up_lora)
    down_input = weighted if mask is None else weighted * mask
    return weighted.sum(0), torch.bmm(down_input, down_a.transpose(1, 2))


@pytest.mark.parametrize("act_fn", [nn.SiLU(), nn.GELU(approximate="tanh"), torch.relu], ids=["silu", "gelu", "relu"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("block_elements", [E * INTER, 2 * E * INTER, 10**6], ids=["1_token", "2_tokens", "1_block"])
def test_equals_plain_autograd_and_passes_gradcheck(act_fn, variant, block_elements, monkeypatch):
    monkeypatch.setattr(dense_mixture, "BLOCK_ELEMENTS", block_elements)
    args = VARIANTS[variant](inputs())
    hidden, z = dense_gated_mixture(act_fn=act_fn, scaling=SCALE, **args)
    ref_hidden, ref_z = plain(act_fn=act_fn, scaling=SCALE, **args)
    torch.testing.assert_close(hidden, ref_hidden)
    torch.testing.assert_close(z, ref_z)
    gen = torch.Generator().manual_seed(1)
    grads = (torch.randn(N, INTER, dtype=torch.float64, generator=gen),
             torch.randn(E, N, R, dtype=torch.float64, generator=gen))
    torch.testing.assert_close(
        torch.autograd.grad((hidden, z), leaves(args), grads),
        torch.autograd.grad((ref_hidden, ref_z), leaves(args), grads),
    )

    assert torch.autograd.gradcheck(as_function(dense_gated_mixture, args, act_fn=act_fn, scaling=SCALE), tuple(leaves(args)))


def test_in_place_activation_and_only_the_wanted_gradients(monkeypatch):
    monkeypatch.setattr(dense_mixture, "BLOCK_ELEMENTS", 2 * E * INTER)
    args = inputs()
    z_gate, b_gate = args["gate_lora"]
    frozen = dict(args, weight=args["weight"].detach(), down_a=args["down_a"].detach(), gate_lora=(z_gate, b_gate.detach()))
    gate_before = args["gate"].detach().clone()
    hidden, z = dense_gated_mixture(act_fn=nn.SiLU(inplace=True), scaling=SCALE, **frozen)
    ref_hidden, ref_z = plain(act_fn=nn.functional.silu, scaling=SCALE, **frozen)
    wanted = (args["gate"], args["up"], z_gate, *args["up_lora"])
    loss, ref_loss = hidden.square().sum() + z.sum(), ref_hidden.square().sum() + ref_z.sum()
    torch.testing.assert_close(torch.autograd.grad(loss, wanted), torch.autograd.grad(ref_loss, wanted))
    assert torch.equal(args["gate"].detach(), gate_before)  # the in-place σ never overwrote an input


def test_keeps_nothing_of_the_expert_token_intermediate_size():
    args = {k: (tuple(t.float() for t in v) if isinstance(v, tuple) else v.float()) for k, v in inputs().items()}
    sizes = []

    def saved(fn):
        sizes.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return [n for n in sizes if n >= E * N * INTER]

    assert saved(lambda: dense_gated_mixture(act_fn=nn.SiLU(), scaling=SCALE, **args)) == []
    assert len(saved(lambda: plain(act_fn=nn.functional.silu, scaling=SCALE, **args))) >= 4


def test_under_cpu_autocast_the_products_stay_in_the_adapter_dtype():
    args = {k: (tuple(t.float().detach() for t in v) if isinstance(v, tuple) else v.float().detach())
            for k, v in inputs().items()}
    args16 = dict(args, gate=args["gate"].bfloat16(), up=args["up"].bfloat16())  # frozen outputs under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, z = dense_gated_mixture(act_fn=nn.SiLU(), scaling=SCALE, **args16)
    plain_hidden, plain_z = dense_gated_mixture(act_fn=nn.SiLU(), scaling=SCALE, **args16)
    assert hidden.dtype == torch.bfloat16 and z.dtype == torch.float32
    assert torch.equal(hidden, plain_hidden) and torch.equal(z, plain_z)


def test_bad_shapes_are_named():
    a = {k: (tuple(t.detach() for t in v) if isinstance(v, tuple) else v.detach()) for k, v in inputs().items()}
    act = nn.SiLU()
    with pytest.raises(ValueError, match=r"gate and up must both be \(N, I\), got \(7, 5\) and \(7, 4\)"):
        dense_gated_mixture(a["gate"], a["up"][:, :4], a["weight"], act, a["down_a"])
    with pytest.raises(ValueError, match=r"weight must be \(E, N, 1\) with N=7, got \(7, 3\)"):
        dense_gated_mixture(a["gate"], a["up"], a["weight"][..., 0].t(), act, a["down_a"])
    with pytest.raises(ValueError, match=r"down_a must be \(E, r, I\) with E=3, I=5, got \(3, 5, 2\)"):
        dense_gated_mixture(a["gate"], a["up"], a["weight"], act, a["down_a"].transpose(1, 2))
    with pytest.raises(ValueError, match=r"mask must be \(N, I\) = \(7, 5\), got \(5, 7\)"):
        dense_gated_mixture(a["gate"], a["up"], a["weight"], act, a["down_a"], a["mask"].t())
    z, b = a["up_lora"]
    with pytest.raises(ValueError, match=r"up_lora must be \(z \(E, N, r\), B \(E, I, r\)\) .* got \(3, 7, 2\) and "
                                         r"\(3, 2, 5\)"):
        dense_gated_mixture(a["gate"], a["up"], a["weight"], act, a["down_a"], up_lora=(z, b.transpose(1, 2)))


def test_a_block_without_down_experts_and_zero_tokens():
    args = inputs()
    no_down = dict(args, down_a=torch.zeros(E, 0, INTER, dtype=torch.float64), mask=None)
    hidden, z = dense_gated_mixture(act_fn=nn.SiLU(), scaling=SCALE, **no_down)
    ref_hidden, _ = plain(act_fn=nn.SiLU(), scaling=SCALE, **no_down)
    assert z.shape == (E, N, 0)
    torch.testing.assert_close(hidden, ref_hidden)
    wanted = [t for t in leaves(no_down) if t.requires_grad]
    torch.testing.assert_close(torch.autograd.grad(hidden.square().sum(), wanted),
                               torch.autograd.grad(ref_hidden.square().sum(), wanted))
    empty = torch.zeros(0, INTER, dtype=torch.float64, requires_grad=True)
    hidden, z = dense_gated_mixture(empty, empty, torch.zeros(E, 0, 1, dtype=torch.float64), nn.SiLU(),
                                    args["down_a"])
    assert hidden.shape == (0, INTER) and z.shape == (E, 0, R)
