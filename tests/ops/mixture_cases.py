"""Shared cases of the blockwise mixture tests (tests/ops/test_dense_mixture.py, test_pair_mixture.py,
test_fused_chain.py): the dense chain's inputs, which gate/up experts and dropout a case has, the tensors it
differentiates, and the function form gradcheck takes."""

import torch


def dense_inputs(num_experts: int, num_tokens: int, width: int, rank: int, dtype=torch.float64, seed: int = 0,
                 mask: bool = True) -> dict:
    """Random leaves for `ops.dense_mixture.dense_gated_mixture`: one unselected pair (weight 0) and a dropout
    mask (p = 0.3) unless `mask` is False."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=dtype, generator=gen)).requires_grad_()

    weight = torch.rand(num_experts, num_tokens, 1, dtype=dtype, generator=gen)
    weight[0, 2] = 0.0  # an unselected pair
    drop = (torch.rand(num_tokens, width, dtype=dtype, generator=gen) > 0.3).to(dtype) / 0.7
    return dict(
        gate=leaf(num_tokens, width), up=leaf(num_tokens, width), weight=weight.requires_grad_(),
        down_a=leaf(num_experts, rank, width, scale=0.5), mask=drop if mask else None,
        gate_lora=(leaf(num_experts, num_tokens, rank), leaf(num_experts, width, rank, scale=0.5)),
        up_lora=(leaf(num_experts, num_tokens, rank), leaf(num_experts, width, rank, scale=0.5)),
    )


VARIANTS = {
    "gate_up_experts_dropout": lambda a: a,
    "up_experts_only": lambda a: {**a, "gate_lora": None, "mask": None},
    "no_gate_up_experts": lambda a: {**a, "gate_lora": None, "up_lora": None},
}


def leaves(args: dict) -> list:
    """gate, up, weight, down_a, then the (z, B) of each projection with experts."""
    found = [args[k] for k in ("gate", "up", "weight", "down_a")]
    for key in ("gate_lora", "up_lora"):
        if args.get(key) is not None:
            found += list(args[key])
    return found


def as_function(mixture, args: dict, **fixed):
    """`mixture` as a function of `leaves(args)`, in that order (for torch.autograd.gradcheck)."""

    def call(*tensors):
        gate, up, weight, down_a, *lora = tensors
        rebuilt = dict(args, gate=gate, up=up, weight=weight, down_a=down_a)
        for key in ("gate_lora", "up_lora"):
            if args[key] is not None:
                rebuilt[key], lora = (lora[0], lora[1]), lora[2:]
        return mixture(**fixed, **rebuilt)

    return call
