"""Random streams of their own: each multi-job job draws its dropout masks and router jitter from its own generator.

With torch's one default generator, a job's masks depend on which other jobs share its steps: the draws of a
step are made in the order its rows meet the layers, so a job's k-th mask is drawn after however many numbers
the other jobs' rows took. Then a resumed run (jobs checkpointed at different steps), a memory budget that defers
a micro-batch, or another split of a round into steps gives a job other masks than the uninterrupted run. With a
stream per job, job j's draws are

    mask_{j,k} = keep_mask(shape_{j,k}, p_j, generator_j)     (`ops.dropout.keep_mask`, in job j's layer order)

whatever else runs in the step, and a checkpoint of the job holds its generator's state, so resume continues
exactly (docs/multijob.md, "Checkpoints, resume, failures").

Generators are registered under an int id (`ops.dropout.register_stream`), which modules keep (`Dropout.use_stream`,
a routed layer's `jitter_streams`) and which the operators below take as plain arguments: torch.compile cannot
pass a generator to an operator, and an int is a constant of the graph. The operators draw each job's rows with
the job's generator, in row order, exactly as the eager layers draw that job's row group, so a compiled step's
masks equal the eager step's.
"""

from __future__ import annotations

import torch

from peft_mole.ops.dropout import (
    GENERATOR_OP_TAGS,
    Dropout,
    _MaskAndScale,
    dropout_scale,
    stream_draw,
    stream_generator,
    stream_keep_mask,
)


def jitter(shape: tuple[int, ...], eps: float, device: torch.device, stream: int) -> torch.Tensor:
    """Router jitter multipliers U(1 − ε, 1 + ε) of `shape` (fp32) from `stream`, over the job's own width
    (`ops.dropout.stream_draw`; 1 beyond it)."""
    def draw(size: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(size, dtype=torch.float32, device=device).uniform_(
            1.0 - eps, 1.0 + eps, generator=stream_generator(stream))

    return stream_draw(shape, stream, draw, 1.0)


def _per_job(out: torch.Tensor, row_jobs: torch.Tensor, slots: int, draw) -> torch.Tensor:
    """`out` with the rows of each job j < slots (row_jobs == j, in row order) replaced by `draw(j, (n_j, *rest))`,
    one draw per job as the eager layers draw its row group; rows of jobs whose draw is None stay as they are."""
    rows: list[list[int]] = [[] for _ in range(slots)]
    for row, job in enumerate(row_jobs.tolist()):  # host values (a read-back on a GPU)
        if job < slots:
            rows[job].append(row)
    for job, picked in enumerate(rows):
        drawn = draw(job, (len(picked), *out.shape[1:])) if picked else None
        if drawn is not None:
            out.index_copy_(0, torch.tensor(picked, device=out.device), drawn)
    return out


@torch.library.custom_op("peft_mole::per_job_keep_mask", mutates_args=(), tags=GENERATOR_OP_TAGS)
def per_job_keep_mask(like: torch.Tensor, row_jobs: torch.Tensor, ps: list[float], streams: list[int],
                      call_site: int) -> torch.Tensor:
    """Keep-mask of like's shape: the rows of job j (row_jobs == j, in order) drawn as one `keep_mask` of
    (n_j, *like.shape[1:]) with p = ps[j] from stream streams[j]; rows of other slots (p 0, base rows) all kept.
    `call_site` keeps calls on the same input apart (see `ops.dropout.compiled_keep_mask`)."""
    def draw(job: int, shape: tuple) -> torch.Tensor | None:
        if ps[job] == 0:
            return None
        return stream_keep_mask(shape, ps[job], like.device, streams[job])

    return _per_job(torch.ones(like.shape, dtype=torch.bool, device=like.device), row_jobs, len(ps), draw)


@per_job_keep_mask.register_fake
def _(like, row_jobs, ps, streams, call_site):
    return torch.empty(like.shape, dtype=torch.bool, device=like.device)


@torch.library.custom_op("peft_mole::per_job_jitter", mutates_args=(), tags=GENERATOR_OP_TAGS)
def per_job_jitter(like: torch.Tensor, row_jobs: torch.Tensor, epsilons: list[float], streams: list[int]
                   ) -> torch.Tensor:
    """Router jitter multipliers of like's shape (fp32): the rows of job j drawn U(1 − ε_j, 1 + ε_j) from stream
    streams[j] as one (n_j, *like.shape[1:]) draw, as the eager router draws them; 1 on other rows."""
    def draw(job: int, shape: tuple) -> torch.Tensor | None:
        eps = epsilons[job]
        if eps <= 0:
            return None
        return jitter(shape, eps, like.device, streams[job])

    return _per_job(torch.ones(like.shape, dtype=torch.float32, device=like.device), row_jobs, len(epsilons), draw)


@per_job_jitter.register_fake
def _(like, row_jobs, epsilons, streams):
    return torch.empty(like.shape, dtype=torch.float32, device=like.device)


def per_job_dropout(x: torch.Tensor, row_jobs: torch.Tensor, dropouts: list[torch.nn.Module | None]) -> torch.Tensor:
    """Each row of x through its job's dropout, drawn from the job's stream (`per_job_keep_mask`), scaled by the
    job's 1 / (1 − p')."""
    from peft_mole.ops.segmented_lora import constant_on

    active = [d if d is not None and d.training and getattr(d, "p", 0.0) > 0 else None for d in dropouts]
    ps = [0.0 if d is None else float(d.p) for d in active]
    streams = [0 if d is None else int(getattr(d, "stream", 0)) for d in active]
    sites = [d.call_site for d in active if d is not None]  # (min(..., default=) breaks a compiled graph)
    call_site = min(sites) if sites else 0
    keep = per_job_keep_mask(x.detach(), row_jobs, ps, streams, call_site)
    # the product in x's opmath precision (float32 for half types, float64 for float64), rounded once to x's dtype,
    # as eager `Dropout` multiplies by its Python float (until 2026-12-07 the scale was rounded to x's dtype first:
    # 1 ulp off in bfloat16 on 8 % of the values, 2e-8 in float64)
    opmath = torch.promote_types(x.dtype, torch.float32)
    scales = constant_on(tuple(dropout_scale(p) for p in ps) + (1.0,), opmath, x.device)
    scale = scales.index_select(0, row_jobs).view(-1, *([1] * (x.dim() - 1)))
    return (torch.where(keep, x, 0) * scale).to(x.dtype)  # (the product promotes to `scale`'s opmath dtype)


def uses_streams(dropouts: list[torch.nn.Module | None]) -> bool:
    """Whether any of the jobs' dropouts draws from a stream of its own."""
    return any(d is not None and vars(d).get("stream", 0) for d in dropouts)  # (no AttributeError raised: host time)


def dropout_pieces(x: torch.Tensor, sizes: list[int], dropouts: list[torch.nn.Module]) -> torch.Tensor:
    """x's consecutive row blocks (`sizes` rows each), each through its own job's dropout: what
    `torch.cat([d(piece) for d, piece in zip(dropouts, x.split(sizes))])` gives. Where every block's dropout is a
    `Dropout` of one rate drawing from a stream of its own, the blocks' masks are drawn from their streams and joined
    (one byte per value) and applied in one pass, rather than joining the dropped inputs (a copy of x)."""
    first = dropouts[0]
    if not (all(isinstance(d, Dropout) and d.stream and d.p == first.p and d.training for d in dropouts)
            and first.p > 0 and not torch.compiler.is_compiling()):
        return torch.cat([d(piece) for d, piece in zip(dropouts, x.split(sizes), strict=True)])
    keep = torch.cat([stream_keep_mask((size, *x.shape[1:]), d.p, x.device, d.stream)
                      for d, size in zip(dropouts, sizes, strict=True)])
    return _MaskAndScale.apply(x, keep, dropout_scale(first.p))
