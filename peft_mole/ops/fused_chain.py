"""One block of the dense gated chain (`ops.dense_mixture`) as two compiled kernels: forward and backward.

The chain of a block of n tokens and E experts (MixLoRA §3, SPEC.md §1; every expert on every token, DynMoLE §3.2),
with B1, B3 already multiplied by the scaling s:

    g_e = W1 x + B1_e z1_e,  u_e = W3 x + B3_e z3_e,  h_e = silu(g_e) ⊙ u_e,
    hidden = Σ_e w_e h_e,    z2_e = A2_e (m ⊙ w_e h_e)

and its backward (the formulas of `ops.dense_mixture`, with silu'(g) = σ(g) (1 + g (1 − σ(g))), σ the sigmoid).
Run operator by operator, the elementwise part between the rank-r products is about fifteen passes over (E, n, I)
values, each a separate kernel; torch.compile (inductor) fuses them into a few loops that keep the values in
registers, and calls the same batched products, which are then about half of the time. Measured on this
repository's CPU (2 threads, E = 8, I = 1376, 1024 tokens, `bench/fused_chain.py`): a layer's chain forward and
backward 0.87x the eager time (docs/performance.md, "DynMoLE").

A kernel is compiled once per (E, n, I, r, dtypes, device, with or without dropout mask, inference mode or not);
`n` is the fixed number of tokens of a full block, and the last, shorter block of a call runs the eager chain, so
a new sequence length never compiles anything. It is an option, off by default: on the CPU a DynMoLE step at init
costs 0.96-1.00x the eager one (the chain is a third of the step) after a first step that compiles for 10-12 s;
it is meant for GPUs, where it is not yet measured. Switch it with `set_fused_chain(True)` or the environment
variable `PEFT_MOLE_FUSED_CHAIN=on`. If compiling fails (inductor needs a C++ compiler on the CPU), one warning is
logged and the eager chain runs from then on. Values and gradients equal the eager chain to rounding
(tests/ops/test_fused_chain.py).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV_VARIABLE = "PEFT_MOLE_FUSED_CHAIN"
ENV_VALUES = {"on": True, "1": True, "true": True, "off": False, "0": False, "false": False}

_state: dict[str, object] = {"enabled": None, "failed": False, "forward": None, "backward": None, "blocks": 0}


def set_fused_chain(enabled: bool | None) -> None:
    """Run full blocks of the dense chain compiled (True) or eagerly (False); None reads `PEFT_MOLE_FUSED_CHAIN`
    again (unset: off). Also clears an earlier compile failure."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_fused_chain: enabled must be True, False or None, got {enabled!r}")
    _state["enabled"], _state["failed"] = enabled, False


def fused_chain_enabled() -> bool:
    """Whether full blocks run the compiled kernels: the switch (or its environment variable), and no earlier
    compile failure."""
    if _state["failed"]:
        return False
    if _state["enabled"] is not None:
        return bool(_state["enabled"])
    value = os.environ.get(ENV_VARIABLE, "off").strip().lower()
    if value not in ENV_VALUES:
        raise ValueError(f"{ENV_VARIABLE} must be one of {sorted(ENV_VALUES)}, got {value!r}")
    return ENV_VALUES[value]


def _experts_gate_and_up(gate, up, z_gate, b_gate, z_up, b_up):
    """g_e, u_e (E, n, I) in the frozen outputs' dtype, the products in the adapters' (as `ops.dense_mixture`). The
    frozen output is added after the product rather than by baddbmm, which would first copy it into every expert's
    output (a pass over (E, n, I)); the addition fuses into the elementwise loop."""
    frozen, products = gate.dtype, z_gate.dtype
    return ((torch.bmm(z_gate, b_gate.transpose(1, 2)) + gate.to(products).unsqueeze(0)).to(frozen),
            (torch.bmm(z_up, b_up.transpose(1, 2)) + up.to(products).unsqueeze(0)).to(frozen))


def _forward_block(gate, up, z_gate, b_gate, z_up, b_up, weight, mask, down_a):
    """(hidden (n, I) in the frozen dtype, z2 (E, n, r) in the products'); b_* already scaled by s."""
    g, u = _experts_gate_and_up(gate, up, z_gate, b_gate, z_up, b_up)
    weighted = F.silu(g) * u * weight  # w_e h_e (E, n, I)
    down_input = weighted if mask is None else weighted * mask
    return weighted.sum(0), torch.bmm(down_input.to(down_a.dtype), down_a.transpose(1, 2))


def _backward_block(gate, up, z_gate, b_gate, z_up, b_up, weight, mask, grad_hidden, grad_z, down_a):
    """Gradients of one block, from the recomputed g_e, u_e: (∂L/∂(W1 x), ∂L/∂(W3 x), ∂L/∂w) in the frozen dtype
    and (∂L/∂z1, ∂L/∂(s B1), ∂L/∂z3, ∂L/∂(s B3), ∂L/∂A2) in the products', the B and A2 ones summed over the
    block's tokens."""
    g, u = _experts_gate_and_up(gate, up, z_gate, b_gate, z_up, b_up)
    products = z_gate.dtype
    sigmoid = torch.sigmoid(g)
    activated = g * sigmoid
    h = activated * u
    delta = torch.bmm(grad_z, down_a).to(h.dtype)  # ∂L/∂z2 A2, (E, n, I)
    if mask is None:
        down_input = h * weight
    else:
        down_input = h * weight * mask
        delta = delta * mask
    delta = delta + grad_hidden  # δ
    grad_weight = (delta * h).sum(-1, keepdim=True)
    grad_h = delta * weight
    grad_u = grad_h * activated
    grad_g = grad_h * u * (sigmoid * (1 + g * (1 - sigmoid)))
    grad_g_p, grad_u_p = grad_g.to(products), grad_u.to(products)
    return (
        grad_g.sum(0), grad_u.sum(0), grad_weight,
        torch.bmm(grad_g_p, b_gate), torch.bmm(grad_g_p.transpose(1, 2), z_gate),
        torch.bmm(grad_u_p, b_up), torch.bmm(grad_u_p.transpose(1, 2), z_up),
        torch.bmm(grad_z.transpose(1, 2), down_input.to(products)),
    )


def _run(name: str, kernel, *args):
    """The compiled `kernel` on `args` (compiled on first use), or None after a compile failure (logged once).
    Out of memory is raised, as it would be by the eager chain; anything else switches the option off."""
    if _state["failed"]:
        return None
    compiled = _state[name]
    if compiled is None:
        compiled = _state[name] = torch.compile(kernel, dynamic=False)
    try:
        out = compiled(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # no C++ compiler, an unsupported backend: the eager chain is always there
        _state["failed"] = True
        logger.warning("peft_mole: compiling the fused expert chain failed (%s: %s); running it eagerly from now "
                       "on. Set %s=off to skip the attempt.", type(error).__name__, error, ENV_VARIABLE,
                       exc_info=True)
        return None
    _state["blocks"] += 1
    return out


def fused_blocks_run() -> int:
    """How many blocks (forward and backward counted apart) the compiled kernels have run in this process."""
    return _state["blocks"]


def _plain(frozen: tuple, adapter: tuple) -> tuple:
    """The inputs as the kernels take them: detached (Dynamo guards on requires_grad, which differs between training
    and evaluation), contiguous (their strides would otherwise change with the call's number of tokens), and the
    adapter side in the products' dtype (the dtype of `adapter[0]`)."""
    products = adapter[0].dtype
    return (*(None if t is None else t.detach().contiguous() for t in frozen),
            *(t.detach().to(products).contiguous() for t in adapter))


def fused_forward_block(gate, up, weight, mask, z_gate, b_gate, z_up, b_up, down_a):
    """`_forward_block` compiled, or None if it cannot be (then run the eager chain). gate, up, weight and mask in
    one (frozen) dtype; the adapter tensors are taken in the dtype of z_gate (the products')."""
    gate, up, weight, mask, z_gate, b_gate, z_up, b_up, down_a = _plain(
        (gate, up, weight, mask), (z_gate, b_gate, z_up, b_up, down_a))
    return _run("forward", _forward_block, gate, up, z_gate, b_gate, z_up, b_up, weight, mask, down_a)


def fused_backward_block(gate, up, weight, mask, grad_hidden, z_gate, b_gate, z_up, b_up, grad_z, down_a):
    """`_backward_block` compiled, or None if it cannot be; dtypes as for `fused_forward_block` (grad_hidden in the
    frozen one, grad_z in the products'). Returns (∂L/∂(W1 x), ∂L/∂(W3 x), ∂L/∂w, ∂L/∂z1, ∂L/∂(s B1), ∂L/∂z3,
    ∂L/∂(s B3), ∂L/∂A2)."""
    gate, up, weight, mask, grad_hidden, z_gate, b_gate, z_up, b_up, grad_z, down_a = _plain(
        (gate, up, weight, mask, grad_hidden), (z_gate, b_gate, z_up, b_up, grad_z, down_a))
    return _run("backward", _backward_block, gate, up, z_gate, b_gate, z_up, b_up, weight, mask, grad_hidden, grad_z,
                down_a)
