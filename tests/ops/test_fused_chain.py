"""The compiled kernels of the dense chain (`ops.fused_chain`): the same values and gradients as the eager chain, on
full blocks only; a new number of tokens compiles nothing new; a compile failure falls back to the eager chain with
one warning; off by default, and the switch and its environment variable reject unknown values."""

import logging

import pytest
import torch
from torch import nn

from peft_mole.ops import dense_mixture, fused_chain
from peft_mole.ops.dense_mixture import dense_gated_mixture
from peft_mole.ops.fused_chain import fused_chain_enabled, set_fused_chain

E, INTER, R = 4, 24, 3
TOKENS_PER_BLOCK = 5


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 5 tokens, and the switch back to its default after each test."""
    monkeypatch.setattr(dense_mixture, "BLOCK_ELEMENTS", TOKENS_PER_BLOCK * E * INTER)
    monkeypatch.delenv(fused_chain.ENV_VARIABLE, raising=False)
    yield
    set_fused_chain(None)


def chain_inputs(num_tokens, dtype=torch.float32, seed=0, mask=True):
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=dtype, generator=gen)).requires_grad_()

    weight = torch.rand(E, num_tokens, 1, dtype=dtype, generator=gen)
    weight[1, 0] = 0.0  # an unselected pair
    drop = (torch.rand(num_tokens, INTER, dtype=dtype, generator=gen) > 0.25).to(dtype) / 0.75
    return dict(
        gate=leaf(num_tokens, INTER), up=leaf(num_tokens, INTER), weight=weight.requires_grad_(),
        down_a=leaf(E, R, INTER, scale=0.5), mask=drop if mask else None,
        gate_lora=(leaf(E, num_tokens, R), leaf(E, INTER, R, scale=0.5)),
        up_lora=(leaf(E, num_tokens, R), leaf(E, INTER, R, scale=0.5)),
    )


def leaves(args):
    return [args["gate"], args["up"], args["weight"], args["down_a"], *args["gate_lora"], *args["up_lora"]]


def values_and_gradients(args, fused=None, act_fn=None):
    """The chain's outputs and gradients, after setting the switch to `fused` (when given)."""
    if fused is not None:
        set_fused_chain(fused)
    hidden, z = dense_gated_mixture(act_fn=act_fn or nn.SiLU(), scaling=1.5, **args)
    gen = torch.Generator().manual_seed(1)
    grads = (torch.randn(hidden.shape, dtype=hidden.dtype, generator=gen),
             torch.randn(z.shape, dtype=z.dtype, generator=gen))
    return (hidden.detach(), z.detach()), torch.autograd.grad((hidden, z), leaves(args), grads)


class CountedKernels:
    """Counts the blocks that `ops.dense_mixture` hands to the compiled kernels."""

    def __init__(self, monkeypatch):
        self.forward = self.backward = 0
        forward, backward = dense_mixture.fused_forward_block, dense_mixture.fused_backward_block

        def counted_forward(*args):
            self.forward += 1
            return forward(*args)

        def counted_backward(*args):
            self.backward += 1
            return backward(*args)

        monkeypatch.setattr(dense_mixture, "fused_forward_block", counted_forward)
        monkeypatch.setattr(dense_mixture, "fused_backward_block", counted_backward)


@pytest.mark.parametrize("mask", [True, False], ids=["dropout", "no_dropout"])
def test_fused_blocks_equal_the_eager_chain(mask, monkeypatch):
    args = chain_inputs(13, mask=mask)  # blocks of 5, 5 and 3 tokens: two compiled, the last one eager
    counted = CountedKernels(monkeypatch)
    (hidden, z), grads = values_and_gradients(args, True)
    assert (counted.forward, counted.backward) == (2, 2)
    (ref_hidden, ref_z), ref_grads = values_and_gradients(args, False)
    assert (counted.forward, counted.backward) == (2, 2)
    torch.testing.assert_close(hidden, ref_hidden)
    torch.testing.assert_close(z, ref_z)
    torch.testing.assert_close(grads, ref_grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_fused_blocks_pass_gradcheck():
    args = chain_inputs(10, dtype=torch.float64)  # two full blocks: everything runs compiled
    set_fused_chain(True)

    def call(gate, up, weight, down_a, z_gate, b_gate, z_up, b_up):
        rebuilt = dict(args, gate=gate, up=up, weight=weight, down_a=down_a, gate_lora=(z_gate, b_gate),
                       up_lora=(z_up, b_up))
        return dense_gated_mixture(act_fn=nn.SiLU(), scaling=1.5, **rebuilt)

    assert torch.autograd.gradcheck(call, tuple(leaves(args)))


def test_a_new_number_of_tokens_compiles_nothing_new():
    values_and_gradients(chain_inputs(11), True)  # compiles the two kernels for 5-token blocks (if not yet)
    torch._dynamo.utils.counters.clear()
    for num_tokens in (12, 17, 23):
        values_and_gradients(chain_inputs(num_tokens, seed=num_tokens), True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # every call was served by the kernels compiled above


def test_only_silu_and_full_ranks_are_fused(monkeypatch):
    counted = CountedKernels(monkeypatch)
    values_and_gradients(chain_inputs(10), True, act_fn=nn.GELU())
    no_gate = chain_inputs(10)
    set_fused_chain(True)
    dense_gated_mixture(act_fn=nn.SiLU(), scaling=1.5, **dict(no_gate, gate_lora=None))
    assert (counted.forward, counted.backward) == (0, 0)
    values_and_gradients(chain_inputs(10), True, act_fn=nn.functional.silu)
    assert (counted.forward, counted.backward) == (2, 2)


def test_a_compile_failure_falls_back_to_the_eager_chain_with_one_warning(monkeypatch, caplog):
    args = chain_inputs(10)
    reference = values_and_gradients(args, False)

    def failing_compile(fn, **options):
        def run(*tensors):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(fused_chain.torch, "compile", failing_compile)
    monkeypatch.setitem(fused_chain._state, "forward", None)
    monkeypatch.setitem(fused_chain._state, "backward", None)
    set_fused_chain(True)
    with caplog.at_level(logging.WARNING, logger="peft_mole.ops.fused_chain"):
        found = values_and_gradients(args)
        values_and_gradients(args)
    warnings = [r for r in caplog.records if "compiling the fused expert chain failed" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0].getMessage()
    assert not fused_chain_enabled()
    torch.testing.assert_close(found, reference)


def test_off_by_default_and_the_switch_and_its_environment_variable(monkeypatch):
    counted = CountedKernels(monkeypatch)
    assert not fused_chain_enabled()
    values_and_gradients(chain_inputs(10))
    assert (counted.forward, counted.backward) == (0, 0)
    set_fused_chain(True)
    assert fused_chain_enabled()
    monkeypatch.setenv(fused_chain.ENV_VARIABLE, "off")
    assert fused_chain_enabled()  # the switch overrides the environment
    with pytest.raises(TypeError, match=r"enabled must be True, False or None, got 'on'"):
        set_fused_chain("on")
    set_fused_chain(None)
    assert not fused_chain_enabled()
    monkeypatch.setenv(fused_chain.ENV_VARIABLE, "ON")
    assert fused_chain_enabled()
    monkeypatch.setenv(fused_chain.ENV_VARIABLE, "fast")
    with pytest.raises(ValueError, match=r"PEFT_MOLE_FUSED_CHAIN must be one of \['0', '1', 'false', 'off', 'on', "
                                         r"'true'\], got 'fast'"):
        fused_chain_enabled()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_dynmole_training_step_with_the_fused_chain_equals_the_eager_step(family, monkeypatch):
    """Through the model: transformers' SiLU module is recognised, dropout masks are the eager ones, and the logits
    and every adapter gradient match."""
    from peft import get_peft_model

    from peft_mole.ops import experts as experts_ops
    from tests.helpers import batch, dynmole, randomize_adapters, tiny_base

    monkeypatch.setattr(experts_ops, "DENSE_FRACTION", 0.5)  # broadcast tokens: the dense chain
    monkeypatch.setattr(dense_mixture, "BLOCK_ELEMENTS", 4 * 6 * 172)  # blocks of 4 tokens (6 experts, I = 172)
    model = get_peft_model(tiny_base(family), dynmole(num_experts=6, lora_dropout=0.1))
    randomize_adapters(model, std=0.15)
    with torch.no_grad():  # near-uniform routers, as at init: every token broadcast
        for name, p in model.named_parameters():
            if "router" in name:
                p.mul_(0.05)
    ids, mask, labels = batch(2, 11, pad_last=2)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(fused):
        set_fused_chain(fused)
        torch.manual_seed(7)  # the same dropout masks
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        return out.logits.detach(), torch.autograd.grad(out.loss, params)

    counted = CountedKernels(monkeypatch)
    logits, grads = step(True)
    assert counted.forward == counted.backward == 2 * 5  # 2 layers, 20 real tokens: 5 full blocks each
    ref_logits, ref_grads = step(False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, atol=1e-6, rtol=1e-4)
