"""Gradients the multi-job trainer stores keep their parameter's layout, so fused optimizers step the right elements.

`torch.autograd.grad` returns a gradient in whatever layout the backward produced (a batched product over a
transposed factor gives a transposed one); `loss.backward()` would copy it into the parameter's layout. PyTorch's
fused AdamW (`adamw_torch_fused`, Trainer's default) reads gradients in the parameter's layout.
"""

import torch

from peft_mole.multijob.run import in_layout_of


def _transposed_grad(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(torch.bmm(x, weight.transpose(1, 2)).square().sum(), weight)
    return grad


def test_stored_gradients_have_the_parameters_layout_and_values():
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 7, 4, generator=gen))
    grad = _transposed_grad(weight, torch.randn(3, 5, 4, generator=gen))
    assert grad.stride() != weight.stride()  # what autograd.grad hands back here
    stored = in_layout_of(weight, grad)
    assert stored.stride() == weight.stride() and torch.equal(stored, grad)
    contiguous = torch.randn(3, 7, 4, generator=gen)
    assert in_layout_of(weight, contiguous) is contiguous  # no copy when the layout already matches


def test_a_fused_adamw_step_on_stored_gradients_equals_the_backward_reference():
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(3, 7, 4, generator=gen)
    x = torch.randn(3, 5, 4, generator=gen)
    ours, reference = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    fused = torch.optim.AdamW([ours], lr=1e-3, fused=True)
    plain = torch.optim.AdamW([reference], lr=1e-3, foreach=False)
    for _ in range(3):
        ours.grad = in_layout_of(ours, _transposed_grad(ours, x))
        torch.bmm(x, reference.transpose(1, 2)).square().sum().backward()
        fused.step()
        plain.step()
        fused.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
    assert (ours - start).abs().max() > 1e-3  # the steps moved the weights
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
