"""Multi-job LoRA products of jobs with equal rank and rows (`ops.segmented_lora._StackedLora`) through
`LoraLinear`: second derivatives and rows of no tokens."""

import torch

from peft_mole.forward_context import ForwardContext
from peft_mole.ops.segmented_lora import stacked_lora


def _lora_linear(ranks=(4, 4)):
    from peft_mole.tuners.mixlora.attention import LoraLinear

    context = ForwardContext()
    layer = LoraLinear(torch.nn.Linear(16, 12, dtype=torch.float64), "a", context)
    for name, rank in zip("ab", ranks, strict=True):
        layer.update_layer(name, r=rank, scaling=2.0 / rank, dropout=0.0)
        with torch.no_grad():
            layer.mixlora_B[name].weight.normal_()
    layer.set_adapter(["a", "b"])
    return layer, context


def test_second_derivatives_through_stacked_jobs_equal_the_per_row_reference():
    """Two jobs of equal rank and rows take `_StackedLora`, whose backward used stacks and a hidden product it made
    itself: a second derivative through it dropped their terms (55.3 against the reference's 67.0 in a review's
    probe, 2026-12-07). Under `create_graph` it now makes them again from its inputs: float64 gradgradcheck, and
    the layer's second derivatives equal those of per-row `F.linear`s."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    factors = [torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
               for shape in ((2, 4), (2, 4), (5, 2), (5, 2))]
    scaling = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda x, *f: stacked_lora(x, scaling, list(f[:2]), list(f[2:])),
                                        (x, *factors))
    layer, context = _lora_linear()
    context.set_row_adapters(["a", "a", "b", "b"])
    inputs = torch.randn(4, 3, 16, dtype=torch.float64, generator=gen, requires_grad=True)

    def second(out):
        (grad_x,) = torch.autograd.grad((out ** 2).sum(), [inputs], create_graph=True)
        return torch.autograd.grad(grad_x.sum(), [layer.mixlora_A["a"].weight, layer.mixlora_B["b"].weight])

    linear = torch.nn.functional.linear
    reference = torch.stack([layer.base_layer(inputs[i]) + layer.mixlora_scaling[name] * linear(
        linear(inputs[i], layer.mixlora_A[name].weight), layer.mixlora_B[name].weight)
        for i, name in enumerate("aabb")])
    for got, want in zip(second(layer(inputs)), second(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_rows_of_no_tokens_give_empty_outputs_on_the_stacked_path():
    """(rows, 0, in) inputs: the stacked path reshaped with -1 on a tensor of no elements and raised (before
    2026-12-07); now (rows, 0, out), as the other paths give."""
    layer, context = _lora_linear()
    context.set_row_adapters(["a", "a", "b", "b"])
    out = layer(torch.randn(4, 0, 16, dtype=torch.float64))
    assert out.shape == (4, 0, 12)
