"""Whether an MLP block that looks gated computes the gated formula the routed block replaces its forward with.

With `router_scope="block"` (MixLoRA, DynMoLE's default) the adapter runs the block itself, SPEC.md §1:
y = W2(Σ_e w_e σ(W1_e x) ⊙ W3_e x) with the frozen W1 x, W3 x once per token. Its frozen part is the Llama-family
block, down_proj(act_fn(gate_proj(x)) ⊙ up_proj(x)). A block with the same projection names may compute more:
a normalisation before down_proj (BitNet), a top-k activation sparsity (Gemma 3n), multipliers (Falcon-H1), a clamp
on the gated product (SwiGLU limits). Replacing its forward would change the model silently: a fresh adapter would
no longer equal the base. So the block's own forward is run on a few random tokens, at the scale of its inputs
and at scales large enough to reach a clamp, and compared with the formula.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_mole.quantised_eval import eval_keeping_4bit_training

PROBE_TOKENS = 8
# the larger probes' largest |gate_proj(x)|: past SwiGLU clamps (7 to 10 in released models), and, gated products
# then reaching about 65536², past clamps set far beyond a model's activations (a limit of 1e4 passed at 64 alone)
LARGE_GATES = (64.0, 65536.0)
RELATIVE_TOLERANCE = 1e-2  # of the formula's largest |output|: room for a fused kernel, far below what differs


def _weights_materialised(mlp: nn.Module) -> bool:
    """False for weights a sharded setup has not gathered (DeepSpeed ZeRO-3 keeps an empty local tensor)."""
    return all(p.numel() > 0 and not hasattr(p, "ds_id") for p in mlp.parameters(recurse=True))


def _gated_formula(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def check_gated_forward(name: str, mlp: nn.Module, width: int, device: torch.device, dtype: torch.dtype) -> None:
    """Raise a ValueError naming the block when its forward is not down_proj(act_fn(gate_proj(x)) ⊙ up_proj(x)).

    Run in eval mode (a block's own dropout would make two calls differ), without autograd, on `PROBE_TOKENS`
    tokens of `width` features, on `device` in `dtype` (the block's input); skipped when the weights are not
    gathered on this process."""
    if not _weights_materialised(mlp):
        return
    x = torch.randn(1, PROBE_TOKENS, width, generator=torch.Generator(device="cpu").manual_seed(0), device="cpu")
    x = x.to(device=device, dtype=dtype)  # (drawn on the CPU: the same tokens on every device, any default device)
    # another adapter's wrappers (LoRA jobs in multi-job training) run their base layers only: the check is about
    # the block's own computation, and those wrappers may expect a batch's rows
    wrappers = [(module, module._disable_adapters) for module in mlp.modules() if isinstance(module, BaseTunerLayer)]
    for module, _ in wrappers:
        module._disable_adapters = True
    try:
        with torch.no_grad(), eval_keeping_4bit_training(mlp):  # (a 4-bit layer's eval mode would end its training)
            largest_gate = mlp.gate_proj(x).abs().max().float().item()
            for scale in (1.0, *(gate / largest_gate for gate in LARGE_GATES if largest_gate > 0)):
                probe = x * scale
                expected = _gated_formula(mlp, probe).float()
                if not torch.isfinite(expected).all():  # (fp16 overflow at a large scale: nothing to compare)
                    continue
                try:
                    own = mlp(probe)
                except Exception as error:  # noqa: BLE001 — any failure means the forward is not the formula
                    raise ValueError(_message(name, mlp, f"its forward(x) fails: {error}")) from error
                own = own[0] if isinstance(own, tuple) else own
                if not isinstance(own, torch.Tensor) or own.shape != expected.shape:
                    raise ValueError(_message(name, mlp, f"its forward returns {type(own).__name__} "
                                                         f"{tuple(getattr(own, 'shape', ()))}"))
                if scale != 1.0 and not torch.isfinite(own).all():  # a fused forward with narrower intermediates
                    continue  # overflowing at a large scale: no clamp to see there (a clamp's outputs are finite)
                difference = (own.float() - expected).abs().max().item()
                if not difference <= RELATIVE_TOLERANCE * expected.abs().max().item():
                    raise ValueError(_message(name, mlp, f"on random inputs (scale {scale:.3g}) its output differs "
                                                         f"from that formula's by up to {difference:.3g}"))
    finally:
        for module, disabled in wrappers:
            module._disable_adapters = disabled


def _message(name: str, mlp: nn.Module, what: str) -> str:
    return (
        f"{name} ({type(mlp).__name__}) does not compute down_proj(act_fn(gate_proj(x)) * up_proj(x)): {what}. "
        "router_scope='block' (MixLoRA, DynMoLE's default) replaces the block's forward with that formula, which "
        "would change the model (a fresh adapter would not equal the base). DynMoLEConfig(router_scope='projection') "
        "keeps the block's own forward and routes experts on its projections"
    )
