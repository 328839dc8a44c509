"""What a multi-job run agrees on across processes (`accelerate launch`), through accelerate's collectives.

Each process trains on its shard of every job's data. Per step the processes agree on which jobs failed (a job
fails everywhere if it fails anywhere) and which micro-batches fit the memory budget; per job optimizer step they
sum the job's gradients, as DDP does for one model (with `average_tokens_across_devices`, the default, each
process's loss is already divided by the job's token count over all processes, so summing is exact; without it
the gradients are averaged). Nothing is exchanged in a single process.
"""

from __future__ import annotations

import functools

import torch


def is_distributed(accelerator) -> bool:
    return accelerator.num_processes > 1


def sum_over_processes(accelerator, value: torch.Tensor) -> torch.Tensor:
    if not is_distributed(accelerator):
        return value
    return accelerator.reduce(value.to(accelerator.device).clone(), reduction="sum")


def any_process(accelerator, flags: list[bool]) -> list[bool]:
    """Element-wise OR of per-process flags."""
    if not is_distributed(accelerator) or not flags:
        return flags
    total = sum_over_processes(accelerator, torch.tensor([float(f) for f in flags]))
    return [bool(v > 0) for v in total.tolist()]


def every_process(accelerator, flags: list[bool]) -> list[bool]:
    """Element-wise AND of per-process flags."""
    if not is_distributed(accelerator) or not flags:
        return flags
    total = sum_over_processes(accelerator, torch.tensor([float(f) for f in flags]))
    return [bool(v >= accelerator.num_processes) for v in total.tolist()]


def gather_rows(accelerator, row: torch.Tensor) -> torch.Tensor:
    """(processes, *row.shape) on the host: every process's `row` (of one shape and dtype everywhere), in process
    order; in one process, `row` alone."""
    if not is_distributed(accelerator):
        return row.unsqueeze(0)
    from accelerate.utils import gather

    return gather(row.to(accelerator.device).unsqueeze(0)).cpu()


def reduce_gradients(accelerator, params: list[torch.nn.Parameter], extra: list[float], mean: bool) -> list[float]:
    """Sum (or average) the gradients of `params` and the numbers `extra` over processes, in one collective, in
    the widest of fp32 and the gradients' dtypes (float64 gradients summed in float64, as DDP sums them). A
    parameter that has no gradient on any process keeps none (an optimizer skips it, as in one process)."""
    if not is_distributed(accelerator):
        return extra
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    dtype = functools.reduce(torch.promote_types, [g.dtype for g in grads], torch.float32)
    had = [float(p.grad is not None) for p in params]
    flat = torch.cat([g.reshape(-1).to(dtype) for g in grads]
                     + [torch.tensor(extra + had, dtype=dtype, device=grads[0].device)])
    flat = sum_over_processes(accelerator, flat)
    if mean:
        flat = flat / accelerator.num_processes
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        grad.copy_(flat[offset: offset + grad.numel()].view(grad.shape))  # in place: keeps the parameter's layout
        param.grad = grad
        offset += grad.numel()
    numbers = flat[offset:].tolist()
    for param, anywhere in zip(params, numbers[len(extra):], strict=True):
        if anywhere == 0:
            param.grad = None
    return numbers[:len(extra)]


def broadcast_parameters(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Start every process from process 0's adapter weights (as DDP does when it wraps a model)."""
    if not is_distributed(accelerator):
        return
    from accelerate.utils import broadcast

    with torch.no_grad():
        for param in params:
            param.copy_(broadcast(param.data.clone(), from_process=0))
