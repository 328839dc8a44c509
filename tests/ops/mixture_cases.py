"""Shared cases of the blockwise mixture tests (tests/ops/test_dense_mixture.py, test_pair_mixture.py): which
gate/up experts and dropout a case has, the tensors it differentiates, and the function form gradcheck takes."""

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
