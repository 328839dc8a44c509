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
from tests.ops.mixture_cases import dense_inputs, leaves

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
    return dense_inputs(E, num_tokens, INTER, R, dtype, seed, mask)


def values_and_gradients(args, fused=None, act_fn=None):
    """The chain's outputs and gradients, after setting the switch to `fused` (when given)."""
    if fused is not None:
        set_fused_chain(fused)
    hidden, z = dense_gated_mixture(act_fn=act_fn or nn.SiLU(), scaling=1.5, **args)
    gen = torch.Generator().manual_seed(1)
    grads = (torch.randn(hidden.shape, dtype=hidden.dtype, generator=gen).to(hidden.device),
             torch.randn(z.shape, dtype=z.dtype, generator=gen).to(z.device))
    return (hidden.detach(), z.detach()), torch.autograd.grad((hidden, z), leaves(args), grads)


class CountedKernels:
    """Counts the blocks that the compiled kernels of `ops.fused_chain` ran (a call that fell back to the eager chain
    is not counted)."""

    def __init__(self, monkeypatch):
        self.forward = self.backward = 0
        forward, backward = dense_mixture.fused_forward_block, dense_mixture.fused_backward_block

        def counted_forward(*args):
            out = forward(*args)
            self.forward += out is not None
            return out

        def counted_backward(*args):
            out = backward(*args)
            self.backward += out is not None
            return out

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


def test_fused_blocks_pass_gradcheck(monkeypatch):
    args = chain_inputs(10, dtype=torch.float64)  # two full blocks: everything runs compiled
    set_fused_chain(True)
    counted = CountedKernels(monkeypatch)

    def call(gate, up, weight, down_a, z_gate, b_gate, z_up, b_up):
        rebuilt = dict(args, gate=gate, up=up, weight=weight, down_a=down_a, gate_lora=(z_gate, b_gate),
                       up_lora=(z_up, b_up))
        return dense_gated_mixture(act_fn=nn.SiLU(), scaling=1.5, **rebuilt)

    assert torch.autograd.gradcheck(call, tuple(leaves(args)))
    assert counted.forward > 0 and counted.backward > 0


def test_a_new_number_of_tokens_or_evaluation_compiles_nothing_new():
    values_and_gradients(chain_inputs(11), True)  # compiles the two kernels for 5-token blocks (if not yet)
    torch._dynamo.utils.counters.clear()
    before = fused_chain.fused_blocks_run()
    for num_tokens in (12, 17, 23):
        values_and_gradients(chain_inputs(num_tokens, seed=num_tokens), True)
    with torch.no_grad():  # evaluation: inputs that do not require gradients
        dense_gated_mixture(act_fn=nn.SiLU(), scaling=1.5, **chain_inputs(15))
    assert fused_chain.fused_blocks_run() - before == 2 * (2 + 3 + 4) + 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # all served by the kernels compiled above


def test_only_silu_and_full_ranks_are_fused(monkeypatch):
    counted = CountedKernels(monkeypatch)
    values_and_gradients(chain_inputs(10), True, act_fn=nn.GELU())
    args = chain_inputs(10)
    dense_gated_mixture(act_fn=nn.SiLU(), scaling=1.5, **dict(args, gate_lora=None))
    dense_gated_mixture(act_fn=nn.SiLU(), scaling=1.5, **dict(args, down_a=torch.zeros(E, 0, INTER)))  # rank 0
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


def test_a_failure_midway_through_the_backward_keeps_the_gradients_exact(monkeypatch, caplog):
    """The first backward block runs compiled and adds its part of the summed gradients; the second fails and the
    eager chain takes over from there: the sums are still whole. Out of memory is raised, not swallowed."""
    args = chain_inputs(13)
    reference = values_and_gradients(args, False)
    values_and_gradients(args, True)  # compiles the kernels
    compiled_backward, calls = fused_chain._state["backward"], []

    def failing_second_call(*tensors):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("kernel failed")
        return compiled_backward(*tensors)

    monkeypatch.setitem(fused_chain._state, "backward", failing_second_call)
    with caplog.at_level(logging.WARNING, logger="peft_mole.ops.fused_chain"):
        found = values_and_gradients(args)
    assert len(calls) == 2 and not fused_chain_enabled()
    torch.testing.assert_close(found, reference)

    def out_of_memory(*tensors):
        raise torch.OutOfMemoryError("no memory left")

    set_fused_chain(True)
    monkeypatch.setitem(fused_chain._state, "forward", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="no memory left"):
        values_and_gradients(args)
    assert fused_chain_enabled()


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


def test_a_bf16_base_with_fp32_adapters_and_partial_gradients(monkeypatch):
    """PEFT keeps adapters in fp32 on a bf16 base: the kernels compute the products in fp32 and the rest in bf16,
    as the eager chain does. Only the wanted gradients are returned."""
    args = chain_inputs(13)
    for name in ("gate", "up", "weight"):
        args[name] = args[name].detach().bfloat16().requires_grad_(name != "weight")
    args["mask"] = args["mask"].bfloat16()
    args["down_a"] = args["down_a"].detach()  # frozen: no gradient wanted
    wanted = [args["gate"], args["up"], *args["gate_lora"], *args["up_lora"]]
    counted = CountedKernels(monkeypatch)
    found = []
    for fused in (True, False):
        set_fused_chain(fused)
        hidden, z = dense_gated_mixture(act_fn=nn.SiLU(), scaling=1.5, **args)
        assert hidden.dtype == torch.bfloat16 and z.dtype == torch.float32
        found.append((hidden, z, torch.autograd.grad(hidden.float().square().sum() + z.sum(), wanted)))
    assert (counted.forward, counted.backward) == (2, 2)
    fused, eager = found
    for a, b in zip((fused[0], fused[1], *fused[2]), (eager[0], eager[1], *eager[2]), strict=True):
        assert a.dtype == b.dtype  # bf16 rounding (the kernels keep fp32 between operations): 1 % of the norm
        assert (a.float() - b.float()).norm() <= 0.01 * b.float().norm()


@pytest.mark.parametrize(("family", "dtype"), [("llama", torch.float32), ("qwen2", torch.float32),
                                             ("llama", torch.bfloat16)], ids=["llama", "qwen2", "llama_bf16"])
def test_a_dynmole_training_step_with_the_fused_chain_equals_the_eager_step(family, dtype, monkeypatch):
    """Through the model: transformers' SiLU module is recognised, dropout masks are the eager ones, and the logits
    and every adapter gradient match (on a bf16 base, whose adapters PEFT keeps in fp32, to bf16 rounding)."""
    from peft import get_peft_model

    from peft_mole.ops import experts as experts_ops
    from tests.helpers import batch, dynmole, randomize_adapters, tiny_base

    monkeypatch.setattr(experts_ops, "DENSE_FRACTION", 0.5)  # broadcast tokens: the dense chain
    monkeypatch.setattr(dense_mixture, "BLOCK_ELEMENTS", 4 * 6 * 172)  # blocks of 4 tokens (6 experts, I = 172)
    model = get_peft_model(tiny_base(family).to(dtype), dynmole(num_experts=6, lora_dropout=0.1))
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
    if dtype == torch.float32:
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        for grad, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(grad, ref, atol=1e-6, rtol=1e-4)
        return
    for found, ref in zip((logits, *grads), (ref_logits, *ref_grads), strict=True):
        assert (found.float() - ref.float()).norm() <= 0.05 * ref.float().norm()  # bf16 rounding, 2 layers deep
