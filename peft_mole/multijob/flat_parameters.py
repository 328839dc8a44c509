"""A job's trainable tensors as views of one flat tensor per optimizer group, for its optimizer (multi-job training).

torch's fused AdamW (`adamw_torch_fused`, `TrainingArguments`' default since torch 2.8) updates every element in one
kernel, but its host work is per tensor: `_init_group` walks the parameters and their states, and the gradient
clipping before it computes one norm per tensor. A LoRA job holds two tensors per adapted projection (28 on the tiny
shape, 56 on the small one, hundreds on a 7B model), and every job of a multi-job step pays this, outside any
compiled graph. Flattened, each optimizer group of a job is one tensor:

    flat_g = the members of group g one after another,   p.data = flat_g[o_p : o_p + numel(p)].view(p.shape)

with each offset o_p a multiple of 16 bytes (`torch._grouped_mm` refuses operands that start elsewhere), the
elements between members zero, with zero gradients (`_gap_views`), so no step moves them,

so the modules, parameter names and saved adapters do not change; the step's gradients of a job are added into
`flat_g.grad` (a buffer kept per flat tensor) by one `torch._foreach_add_`, and clipping and the optimizer see one
tensor per group. Measured on this repository's CPU (`bench/job_optimizer.py`: clipping + fused AdamW;
docs/performance-multijob.md, "Flat job optimizers"): 359 µs per job and step over the 28 tensors of a tiny-shape
LoRA job, 190 µs flat; 976 against 613 µs for the small shape's 56.

What changes, and what does not:
- The update is elementwise (Adam, AdamW, SGD), so every element moves as before; the clipping norm sums the same
  squares in another order (equal to rounding). Optimizers whose update is not elementwise (Adafactor's factored
  moments, blockwise 8-bit states) are never flattened: `flattening_applies`.
- A tensor of the job that got no gradient in a window (`autograd.grad` gave None) takes a zero gradient instead of
  being skipped by the optimizer: its moments decay and weight decay applies. In a LoRA job every tensor gets a
  gradient each window.
- Checkpoints keep the per-tensor optimizer layout a plain `Trainer` writes (`per_tensor_state`), and either layout
  resumes into the flat one (`flat_state`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ELEMENTWISE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def flattening_applies(optimizer_cls, optimizer_kwargs: dict, device: torch.device) -> bool:
    """Whether a job's optimizer takes flat tensors: an elementwise torch optimizer, fused (one pass over each element)
    or on an accelerator. Not for the unfused ones on a CPU: their per-operator passes run in cache over small tensors
    and from memory over a flat one (default AdamW, small shape: 3.3 ms per tensor, 13.7 ms flat)."""
    if optimizer_cls not in ELEMENTWISE_OPTIMIZERS:
        return False
    return bool(optimizer_kwargs.get("fused")) or torch.device(device).type != "cpu"


class FlatGroups:
    """The flat tensors of one job's optimizer groups, and the views its parameters became.

    Args:
        groups: per optimizer group, the parameters in order. Each group's parameters of one dtype and device
            become one flat `nn.Parameter` (normally one per group; an empty group has none).
    """

    def __init__(self, groups: Sequence[Sequence[nn.Parameter]]) -> None:
        self.groups: list[list[tuple[nn.Parameter, list[nn.Parameter]]]] = []  # per group: (flat, members)
        self.order: list[nn.Parameter] = [p for group in groups for p in group]
        self._position = {id(p): i for i, p in enumerate(self.order)}  # in a per-tensor optimizer's numbering
        if len(self._position) != len(self.order):
            raise ValueError("FlatGroups: a parameter appears twice in the optimizer groups")
        self._buffers: list[torch.Tensor] = []  # per flat tensor, its gradient buffer (made below, before any step)
        self._views: dict[tuple[int, ...], list[torch.Tensor]] = {}  # per order of parameters: views of the buffers
        self._offsets: dict[int, int] = {}  # where each parameter starts in its flat tensor
        for group in groups:
            parts: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
            for param in group:
                parts.setdefault((param.dtype, param.device), []).append(param)
            flats = []
            for members in parts.values():
                # each member starts at a multiple of 16 bytes, as `torch._grouped_mm` requires of its operands (an
                # expert stack used as one); the elements between stay 0, with 0 gradients, so no step moves them
                align = max(1, 16 // members[0].element_size())
                offset = 0
                for param in members:
                    self._offsets[id(param)] = offset
                    offset += -(-param.numel() // align) * align
                flat = nn.Parameter(torch.zeros(offset, dtype=members[0].dtype, device=members[0].device))
                for param in members:
                    start = self._offsets[id(param)]
                    member = flat.data[start: start + param.numel()].view(param.shape)
                    member.copy_(param.detach())
                    param.data = member
                flats.append((flat, members))
            self.groups.append(flats)
        # made now, not at the first gradient: an allocation inside `add_gradients` could run out of memory after
        # some jobs of a step had added theirs, and the trainer's retry would add those again
        self._buffers = [torch.zeros_like(flat) for flat in self.tensors]
        self._gaps = self._gap_views()

    def _gap_views(self) -> list[torch.Tensor]:
        """Views of the gradient buffers' elements between (and after) the members: the copy of a step's first
        gradients leaves them as they were, so it zeroes them (a clipping of non-finite gradients scales them by
        NaN, and they would stay NaN, every later norm with them)."""
        gaps = []
        members_per_flat = [members for flats in self.groups for _, members in flats]
        for buffer, members in zip(self._buffers, members_per_flat, strict=True):
            end = 0
            for param in members + [None]:
                start = buffer.numel() if param is None else self._offsets[id(param)]
                if start > end:
                    gaps.append(buffer[end:start])
                end = start if param is None else start + param.numel()
        return gaps

    def offset(self, param: nn.Parameter) -> int:
        """Where `param` starts in its flat tensor (a multiple of 16 bytes)."""
        return self._offsets[id(param)]

    def optimizer_groups(self, groups: Sequence[dict]) -> list[dict]:
        """The optimizer's parameter groups (the same settings) with the flat tensors in place of the parameters."""
        if len(groups) != len(self.groups):
            raise ValueError(f"FlatGroups has {len(self.groups)} groups, the optimizer {len(groups)}")
        return [{**group, "params": [flat for flat, _ in flats]}
                for group, flats in zip(groups, self.groups, strict=True)]

    @property
    def tensors(self) -> list[nn.Parameter]:
        """What the optimizer steps: the flat tensors, in group order."""
        return [flat for flats in self.groups for flat, _ in flats]

    def add_gradients(self, params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
        """Add one backward's gradients of the job's parameters (any order; None = no gradient, counted as zeros)
        to the flat tensors' gradients, with one `torch._foreach_add_` into views of a gradient buffer kept per flat
        tensor (a flat tensor without gradient gets its zeroed buffer first), so no Python work per parameter. The
        first backward of a step, with a gradient for every parameter, is copied in with `torch._foreach_copy_`
        instead (one pass over the buffers where zeroing and adding took two)."""
        views = self._grad_views(params)
        fresh = all(flat.grad is None for flat in self.tensors)
        if fresh and grads and all(g is not None for g in grads):  # the views cover every member: only the gaps
            torch._foreach_copy_(views, list(grads))  # between them are zeroed
            if self._gaps:
                torch._foreach_zero_(self._gaps)
            for flat, buffer in zip(self.tensors, self._buffers, strict=True):
                flat.grad = buffer
            return
        for flat, buffer in zip(self.tensors, self._buffers, strict=True):
            if flat.grad is None:
                buffer.zero_()
            elif flat.grad is not buffer:  # a gradient set from outside: carried over
                buffer.copy_(flat.grad)
        if any(g is None for g in grads):  # None adds nothing
            views = [v for v, g in zip(views, grads, strict=True) if g is not None]
            grads = [g for g in grads if g is not None]
        if grads:
            torch._foreach_add_(views, list(grads))
        for flat, buffer in zip(self.tensors, self._buffers, strict=True):
            flat.grad = buffer

    def _grad_views(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        """Views of the gradient buffers shaped as `params` (in that order), made once per order."""
        key = tuple(id(p) for p in params)
        if key not in self._views:
            if len(set(key)) != len(key) or len(key) != len(self.order) or any(i not in self._position for i in key):
                raise ValueError(f"add_gradients: gradients for {len(set(key))} parameters, "
                                 f"this job has {len(self.order)}")
            where = {}
            members_per_flat = [members for flats in self.groups for _, members in flats]
            for buffer, members in zip(self._buffers, members_per_flat, strict=True):
                for param in members:
                    start = self._offsets[id(param)]
                    where[id(param)] = buffer[start: start + param.numel()].view(param.shape)
            self._views[key] = [where[i] for i in key]
        return self._views[key]

    def zero_grad(self) -> None:
        for flat in self.tensors:
            flat.grad = None

    @property
    def gradient_bytes(self) -> int:
        """Bytes of the gradient buffers (0 once released)."""
        return sum(buffer.nbytes for buffer in self._buffers)

    def release_gradients(self) -> None:
        """Free the gradient buffers of a job that has ended (no gradient can be added after this)."""
        self.zero_grad()
        self._buffers, self._views, self._gaps = [], {}, []

    # ------------------------------------------------------------------ checkpoints
    def per_tensor_state(self, state: dict) -> dict:
        """A flat optimizer's `state_dict()` in the layout of an optimizer over the parameters themselves (what a plain
        Trainer saves): per-element state split and shaped per parameter, other entries (the step) copied."""
        per_param = {}
        pairs = [pair for flats in self.groups for pair in flats]  # (flat, members), numbered as the optimizer does
        for flat_index, (flat, members) in enumerate(pairs):
            saved = state["state"].get(flat_index)
            if saved is None:
                continue
            for param in members:
                per_param[self._index(param)] = {
                    key: _piece(value, flat.numel(), self._offsets[id(param)], param) for key, value in saved.items()
                }
        groups, position = [], 0
        for group, flats in zip(state["param_groups"], self.groups, strict=True):
            count = sum(len(members) for _, members in flats)
            groups.append({**group, "params": list(range(position, position + count))})
            position += count
        return {"state": dict(sorted(per_param.items())), "param_groups": groups}

    def flat_state(self, state: dict) -> dict:
        """A saved optimizer state for the flat optimizer's `load_state_dict`: the per-tensor layout of
        `per_tensor_state` is joined (a parameter without state, never stepped, starts at zeros with the group's
        step count), a flat one is checked and returned. Every per-element entry must have its tensor's size: a
        state of another job or split raises ValueError (torch's loader checks only the counts, and a fused step
        over a wrongly sized state writes out of bounds)."""
        groups = state["param_groups"]
        counts = [len(g["params"]) for g in groups]
        members = [[m for _, ms in flats for m in ms] for flats in self.groups]
        if len(groups) != len(self.groups):
            raise ValueError(f"optimizer state with {len(groups)} groups does not fit this job ({len(self.groups)})")
        if counts == [len(m) for m in members]:  # per tensor (also when each flat tensor has one member)
            return self._joined_state(state)
        if counts != [len(flats) for flats in self.groups]:
            raise ValueError(f"optimizer state with {counts} tensors per group does not fit this job "
                             f"({[len(m) for m in members]} parameters, {[len(f) for f in self.groups]} flat)")
        for index, flat in enumerate(self.tensors):
            for key, value in state["state"].get(index, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() != flat.numel():
                    raise ValueError(f"optimizer state {key!r} of flat tensor {index} has {value.numel()} values, "
                                     f"the tensor {flat.numel()}")
        return state

    def _joined_state(self, state: dict) -> dict:
        flat_states, groups, position = {}, [], 0
        for group, flats in zip(state["param_groups"], self.groups, strict=True):
            groups.append({**group, "params": list(range(position, position + len(flats)))})
            for flat, members in flats:
                saved = [state["state"].get(self._index(p)) or {} for p in members]
                keys = [key for s in saved for key in s]
                entry = {}
                for key in dict.fromkeys(keys):
                    values = [s.get(key) for s in saved]
                    entry[key] = _joined(key, values, members, flat, [self._offsets[id(p)] for p in members])
                if entry:
                    flat_states[position] = entry
                position += 1
        return {"state": flat_states, "param_groups": groups}

    def _index(self, param: nn.Parameter) -> int:
        return self._position[id(param)]


def _piece(value, total: int, offset: int, param: nn.Parameter):
    """One parameter's part of a flat tensor's state entry: its slice of a per-element tensor, else a copy."""
    if isinstance(value, torch.Tensor) and value.numel() == total and value.dim() == 1 and total > 1:
        return value[offset: offset + param.numel()].view(param.shape).clone()
    return value.clone() if isinstance(value, torch.Tensor) else value


def _joined(key: str, values: list, members: list[nn.Parameter], flat: nn.Parameter, offsets: list[int]):
    """The flat state entry `key` from the members' ones: per-element tensors (any with a dimension) put at their
    members' `offsets`, zeros where a member has none (and between members), each checked against its member's
    size; any other entry (the step) taken from the first member that has it."""
    known = [v for v in values if v is not None]
    if not any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in known):
        return known[0].clone() if isinstance(known[0], torch.Tensor) else known[0]
    example = next(v for v in known if isinstance(v, torch.Tensor))
    joined = torch.zeros(flat.numel(), dtype=example.dtype, device=example.device)
    for value, param, start in zip(values, members, offsets, strict=True):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.numel() != param.numel():
            size = value.numel() if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"optimizer state {key!r} has {size} values for a tensor of {param.numel()}")
        joined[start: start + param.numel()] = value.reshape(-1).to(example.dtype)
    return joined


def job_optimizer(optimizer_cls, optimizer_kwargs: dict, groups: list[dict], device, flatten: bool = True):
    """(optimizer, FlatGroups or None) for one job's parameter groups: over flat tensors when `flatten` and
    `flattening_applies`, else over the parameters themselves."""
    flat = None
    if flatten and flattening_applies(optimizer_cls, optimizer_kwargs, device):
        flat = FlatGroups([group["params"] for group in groups])
        groups = flat.optimizer_groups(groups)
    return optimizer_cls(groups, **optimizer_kwargs), flat
