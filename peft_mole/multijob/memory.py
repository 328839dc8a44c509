"""Peak-memory model of a training step (ASPEN, SPEC.md §3), per kind of job.

    Mem ≈ β0 + Σ_k (γ_k · n_k + β1_k · T_k) + β2 · Σ_i L_i²

over the rows i of the mixed batch, with L_i the (padded) row length, and for each kind k of job in the step n_k
its jobs and T_k = Σ_{i of kind k} L_i their tokens. The activations grow linearly with the tokens, at a rate
set by the adapter a token goes through (a MixLoRA token keeps its router's and experts' activations, a LoRA token
two rank-r products per projection); each job adds a constant (a MixLoRA job stacks its experts' factors in
every layer's forward, 13 MB per job on the small shape, about 60 of its tokens); the attention scores grow
quadratically with a row's length, whatever the adapter. Jobs whose adapter configurations are equal share a kind
(`adapter_memory_kind`); with one kind and one job this is ASPEN's Mem ≈ β0 + β1·Σ L + β2·Σ L². β is fitted by
least squares on a few profiling steps (`fit_by_profiling`). What is measured:

- on CUDA: `torch.cuda.max_memory_allocated` during the step;
- on CPU (no allocator statistics): the bytes of the tensors autograd saves for backward during the forward
  (`activation_bytes`), the part that changes with the batch. Frozen weights that autograd saves (for the input's
  gradient) count once per step, a constant in β0; gradient buffers and optimizer states are not in it: the
  scheduler adds every job's optimizer state and gradients to a CPU prediction (`measures_resident`,
  `JobScheduler.resident_change`), where on CUDA it adds only their change since profiling. With activation
  checkpointing (SFTConfig's default) the forward saves the checkpointed layers' inputs only; the layer recomputed
  in the backward saves into checkpointing's own hooks, which this count does not see, so a CPU budget is below the
  true peak by about one layer's activations. The CPU measure is an approximation; a GPU's peak is exact.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)

Job = Hashable  # a job's name (None: the one job of a model fitted without names)
RowJobs = Sequence[Job | Mapping[Job, int]] | None  # per row: its job, or a packed row's tokens per job

# configuration fields that do not change what a step keeps in memory: jobs differing only in these share a kind
_NOT_MEMORY_FIELDS = ("base_model_name_or_path", "revision", "inference_mode", "lora_alpha", "peft_version")


def adapter_memory_kind(config) -> str:
    """A job's memory kind: its adapter configuration's type and fields (as JSON), without the fields that do not
    change a step's memory (`_NOT_MEMORY_FIELDS`). Jobs with equal configurations share their coefficients."""
    fields = {key: value for key, value in config.to_dict().items() if key not in _NOT_MEMORY_FIELDS}
    as_json = lambda value: sorted(map(str, value)) if isinstance(value, (set, frozenset)) else str(value)  # noqa: E731
    return f"{type(config).__name__}:{json.dumps(fields, sort_keys=True, default=as_json)}"


def tokens_per_job(lengths: Sequence[int], jobs: RowJobs) -> dict[Job, int]:
    """{job: tokens} of a batch: `jobs` gives each row's job (None: every row is of job None), or, for a packed row
    holding several jobs' sequences, a mapping {job: tokens} that sums to the row's length."""
    if jobs is None:
        return {None: int(sum(lengths))}
    if len(jobs) != len(lengths):
        raise ValueError(f"jobs has {len(jobs)} entries for {len(lengths)} rows; give one per row")
    tokens: dict[Job, int] = {}
    for length, job in zip(lengths, jobs, strict=True):
        parts = job if isinstance(job, Mapping) else {job: length}
        if sum(parts.values()) != length:
            raise ValueError(f"a packed row's tokens per job {dict(parts)} do not sum to its length {length}")
        for key, count in parts.items():
            tokens[key] = tokens.get(key, 0) + int(count)
    return tokens


class MemoryModel:
    """Least-squares fit of peak step memory (bytes) against [1, jobs of each kind, tokens of each kind, Σ L²].

    Args:
        kind_of: {job: its memory kind}; a job not in it is a kind of its own.

    A kind's job count is a column only where the samples vary it (a kind always profiled as one job has its
    per-job constant in β0). Example:
        >>> m = MemoryModel()
        >>> for rows, length in [(1, 16), (2, 16), (1, 64), (4, 32)]:
        ...     m.observe([length] * rows, 1000 + 10 * rows * length + 0.5 * rows * length**2)
        >>> round(m.predict([48] * 2))
        4264
        >>> m = MemoryModel(kind_of={"a": "lora", "b": "lora", "m": "moe"})  # 300 bytes per MixLoRA job, 25 per token
        >>> for jobs, length in [(["a"], 16), (["a", "a"], 16), (["a"], 64), (["m"], 16), (["m", "m"], 32)]:
        ...     moe = sum(job == "m" for job in jobs) * length
        ...     m.observe([length] * len(jobs), 1000 + 300 * ("m" in jobs) + 10 * (len(jobs) * length - moe)
        ...               + 25 * moe + 0.5 * len(jobs) * length**2, jobs=jobs)
        >>> m.observe([32, 32], 1000 + 300 + 10 * 32 + 25 * 32 + 0.5 * 2 * 32**2, jobs=["a", "m"])
        >>> round(m.predict([48, 48], jobs=["b", "m"]))
        5284
    """

    def __init__(self, kind_of: Mapping[Job, Hashable] | None = None) -> None:
        self.kind_of: dict[Job, Hashable] = dict(kind_of or {})
        self.samples: list[tuple[dict[Job, int], float, float]] = []  # (tokens per job, Σ L², bytes)
        self.beta: torch.Tensor | None = None
        self.columns: tuple[list[Hashable], list[Hashable]] = ([], [])  # (kinds, kinds whose job count is fitted)
        self._fitted: bool | None = None  # `fitted`, until the next sample

    def kind(self, job: Job) -> Hashable:
        return self.kind_of.get(job, job)

    def set_kinds(self, kind_of: Mapping[Job, Hashable]) -> None:
        """Add {job: kind} entries (a new mapping changes the columns: the fit is made again)."""
        self.kind_of.update(kind_of)
        self.beta, self._fitted = None, None

    def observe(self, lengths: Sequence[int], peak_bytes: float, jobs: RowJobs = None) -> None:
        tokens = tokens_per_job(lengths, jobs)
        self.samples.append((tokens, float(sum(length * length for length in lengths)), float(peak_bytes)))
        self.beta, self._fitted = None, None

    def _counts(self, tokens: dict[Job, int]) -> tuple[dict[Hashable, int], dict[Hashable, int]]:
        jobs, kind_tokens = {}, {}
        for job, count in tokens.items():
            kind = self.kind(job)
            jobs[kind] = jobs.get(kind, 0) + 1
            kind_tokens[kind] = kind_tokens.get(kind, 0) + count
        return jobs, kind_tokens

    def _layout(self) -> tuple[list[Hashable], list[Hashable]]:
        """The kinds of the samples (in order of appearance), and those whose job count varies over the samples."""
        counts = [self._counts(tokens)[0] for tokens, _, _ in self.samples]
        kinds = list(dict.fromkeys(kind for jobs in counts for kind in jobs))
        varying = [kind for kind in kinds if len({jobs.get(kind, 0) for jobs in counts}) > 1]
        return kinds, varying

    def _features(self, tokens: dict[Job, int], squares: float, layout) -> list[float]:
        kinds, counted = layout
        jobs, kind_tokens = self._counts(tokens)
        return [1.0, *(float(jobs.get(k, 0)) for k in counted), *(float(kind_tokens.get(k, 0)) for k in kinds), squares]

    def _design(self, layout) -> torch.Tensor:
        return torch.tensor([self._features(t, s, layout) for t, s, _ in self.samples], dtype=torch.float64)

    @property
    def kinds(self) -> list[Hashable]:
        return self._layout()[0]

    @property
    def fitted(self) -> bool:
        """Whether the samples determine every coefficient (a design matrix of full column rank)."""
        if self._fitted is None:
            x = self._design(self._layout()) if self.samples else torch.zeros(0, 1)
            self._fitted = x.shape[0] >= x.shape[1] > 0 and int(
                torch.linalg.matrix_rank(x / x.abs().amax(0).clamp(min=1.0))) == x.shape[1]
        return self._fitted

    def fit(self) -> torch.Tensor:
        """β: [β0, γ_k of `columns[1]`, β1_k of `columns[0]`, β2], by least squares in float64 (features are scaled
        so that Σ L² does not swamp the rest). β2 ≥ 0: a step's memory does not fall as its rows grow, so a negative
        β2 (rows whose attention keeps no (L × L) tensor, e.g. packed sequences attended apart: noise) is 0, the rest
        fitted without it; a prediction past the profiled lengths then grows linearly, not down."""
        layout = self._layout()
        if not self.fitted:
            raise ValueError(f"the memory model needs samples that determine every coefficient: at least "
                             f"{len(layout[0]) + len(layout[1]) + 2} different batch shapes (3 with one kind of job), "
                             f"with each kind of job also observed apart from the others ({len(layout[0])} kinds)")
        x = self._design(layout)
        y = torch.tensor([v for _, _, v in self.samples], dtype=torch.float64)
        scale = x.abs().amax(0).clamp(min=1.0)
        solution = torch.linalg.lstsq(x / scale, y.unsqueeze(1)).solution.squeeze(1)
        if solution[-1] < 0:
            linear = torch.linalg.lstsq(x[:, :-1] / scale[:-1], y.unsqueeze(1)).solution.squeeze(1)
            solution = torch.cat([linear, linear.new_zeros(1)])
        self.beta, self.columns = solution / scale, layout
        return self.beta

    def fit_by_profiling(self, run_step, device: torch.device, vocab_size: int, max_length: int,
                         jobs: Mapping[Job, Hashable] | Sequence[Job] = (None,), packed: bool = False) -> torch.Tensor:
        """Observe synthetic steps of growing shape, then fit. `run_step(ids, row_jobs)` runs forward + backward on
        (rows, length) random token ids, row i through job `row_jobs[i]`; its peak is measured by `step_memory`.
        `jobs`: the jobs, or {job: its memory kind} (added to `kind_of`). `packed`: `run_step` runs the rows as
        one packed row (padding-free training), and each sample is that one row of {job: tokens}, as the scheduler
        predicts packed steps; its attention grows with the square of the whole row, not of each sequence, where
        the attention materialises scores or a block-diagonal mask.

        The steps: five shapes with the first job; one with two jobs of its kind, where there are two; for each
        further kind (`kind_of`), two shapes with its first job and one shared with the first job, which tells its
        per-job constant and rate apart from the first kind's. The first job's five shapes and each further kind's
        first step also run once, unmeasured, before: a compiled model compiles there (one-row and several-row
        graphs, each again when its sizes turn dynamic), and each kind's first call makes its lazy buffers, so no
        measured peak holds the compiler's work or first-call allocations.

        A profiling step that runs out of memory (its shapes hold up to twice `max_length`'s tokens, whatever the
        jobs' batch sizes) starts the profile again at half the length, down to 8 tokens; the fit then extrapolates
        to longer steps (before 2026-12-07 the error ended `train()`)."""
        if not jobs:
            raise ValueError("fit_by_profiling needs at least one job")
        if isinstance(jobs, Mapping):
            self.set_kinds(jobs)
        by_kind: dict[Hashable, list[Job]] = {}
        for job in jobs:
            by_kind.setdefault(self.kind(job), []).append(job)
        kept = len(self.samples)

        def profile(longest: int) -> None:
            del self.samples[kept:]  # (a shorter try after one that ran out of memory)
            self._profile(run_step, torch.device(device), vocab_size, longest, list(by_kind.values()), packed)

        halving_on_oom(profile, max(max_length, 8), "a memory-profiling step of %d tokens per row ran out of memory; "
                       "profiling again at %d")
        return self.fit()

    def _profile(self, run_step, device: torch.device, vocab_size: int, longest: int, kinds: list[list[Job]],
                 packed: bool) -> None:
        """The steps of `fit_by_profiling` at rows of up to `longest` tokens, observed."""
        (first, *same), *further = kinds
        plan = [([first] * rows, length) for rows, length in
                [(1, longest // 4), (2, longest // 2), (1, longest), (2, longest), (4, longest // 2)]]
        warm_up = plan[:5] + [([job], longest // 2) for job, *_ in further]
        plan += [([first, same[0]], longest)] if same else []
        for job, *_ in further:
            plan += [([job], longest // 2), ([job, job], longest), ([first, job], longest // 2)]
        # the random ids and the steps' dropout draw from a forked generator, so training after profiling draws
        # what it would have drawn without it
        with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
            for index, (row_jobs, length) in enumerate(warm_up + plan):
                ids = torch.randint(0, vocab_size, (len(row_jobs), length), device=device)
                if index < len(warm_up):
                    run_step(ids, row_jobs)
                    continue
                peak = step_memory(device, lambda ids=ids, row_jobs=row_jobs: run_step(ids, row_jobs))
                if packed:
                    self.observe([length * len(row_jobs)], peak, jobs=[tokens_per_job([length] * len(row_jobs),
                                                                                        row_jobs)])
                else:
                    self.observe([length] * len(row_jobs), peak, jobs=row_jobs)

    def predict(self, lengths: Sequence[int], jobs: RowJobs = None) -> float:
        """Predicted bytes of a step whose rows have `lengths` and `jobs` (see `tokens_per_job`)."""
        tokens = tokens_per_job(lengths, jobs)
        beta = self.beta if self.beta is not None else self.fit()
        unknown = sorted({str(self.kind(job)) for job in tokens if self.kind(job) not in self.columns[0]})
        if unknown:
            raise ValueError(f"the memory model was not fitted on the kinds of jobs {unknown}; it knows "
                             f"{[str(kind) for kind in self.columns[0]]}")
        squares = float(sum(length * length for length in lengths))
        return float(torch.tensor(self._features(tokens, squares, self.columns), dtype=torch.float64) @ beta)

    def relative_errors(self) -> list[float]:
        """|predicted − measured| / measured over the observed samples."""
        beta = self.beta if self.beta is not None else self.fit()
        predicted = self._design(self.columns) @ beta
        return [abs(p - v) / max(v, 1.0) for p, (_, _, v) in zip(predicted.tolist(), self.samples, strict=True)]


def is_oom(error: BaseException) -> bool:
    """An out-of-memory error: torch's, a backend's message, or the CPU allocator's ("DefaultCPUAllocator: can't
    allocate memory", a RuntimeError)."""
    message = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or "can't allocate memory" in message


def free_memory() -> None:
    """What a failed step left before its retry: call it outside the except block (the traceback would keep the
    failed forward's tensors alive)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def halving_on_oom(attempt, length: int, warning: str) -> int:
    """`attempt(length)`, again at half the length (down to 8 tokens) while it runs out of memory; the length that
    ran. `warning` (%d: the failed length, then the next) is logged at each retry; any other error is raised."""
    while True:
        try:
            attempt(length)
            return length
        except Exception as error:  # noqa: BLE001 — out of memory only; anything else is raised
            if not is_oom(error) or length <= 8:
                raise
        free_memory()  # (outside the except block: its traceback holds the failed step's tensors)
        logger.warning(warning, length, max(length // 2, 8))
        length = max(length // 2, 8)


@contextmanager
def activation_bytes():
    """Count the bytes autograd saves for backward inside the block: `with activation_bytes() as meter: ...`,
    then `meter["bytes"]`. Tensors saved twice (same storage) count once."""
    meter = {"bytes": 0}
    seen: set[int] = set()

    def pack(tensor: torch.Tensor):
        try:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                meter["bytes"] += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some views)
            meter["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield meter


def forced_selection(num_experts: int, dense: bool):
    """A routing rule for profiling that picks a fixed share of the (token, expert) pairs, the most probable
    experts of each token: every pair (`dense`), or the most pairs that still dispatch,
    ⌈DENSE_FRACTION·N·E⌉ − 1, spread evenly over the N tokens (`ops.experts.dense_weights` switches to the dense
    path at DENSE_FRACTION)."""
    from peft_mole.ops.experts import DENSE_FRACTION

    def rule(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = probs.shape[0]
        pairs = tokens * num_experts if dense else max(math.ceil(DENSE_FRACTION * tokens * num_experts) - 1, tokens)
        counts = torch.full((tokens, 1), pairs // max(tokens, 1), device=probs.device)
        counts[: pairs % max(tokens, 1)] += 1
        weights, chosen = probs.sort(dim=-1, descending=True)
        return torch.where(torch.arange(num_experts, device=probs.device) < counts, weights, 0.0), chosen

    return rule


@contextmanager
def costliest_selection(run_step, device: torch.device, settings: Mapping[Job, Sequence], vocab_size: int,
                        length: int, kind_of: Mapping[Job, Hashable] | None = None):
    """Profile jobs whose experts per token depend on their routers (DynMoLE) at their costliest selection.

    A DynMoLE step keeps what its (token, expert) pairs need: the dispatch path grows with the pairs, up to the
    DENSE_FRACTION of all pairs where the layer switches to the dense path (every pair, computed expert-major). So
    whatever its routers learn, a step keeps at most the larger of: the most pairs that still dispatch, and every
    pair. For each job of `settings` ({job: its layers' `ExpertSettings`}) both are measured on one two-row step of
    `length` tokens (`forced_selection`, after one unmeasured run of each, which holds a first call's
    allocations), and the costlier is set as every such job's rule for the block; the rules are given back after.
    With `kind_of` ({job: memory kind}) only the first job of each kind is measured and the others of its kind
    follow its choice. Yields {measured job: {"dispatch": bytes, "dense": bytes, "tokens": the length measured}}.
    (Scaling the routers instead,
    ×10 and ×100, missed the peak, which lies between: up to 55 % more on the tiny test model.) A step that runs
    out of memory is measured again at half the length, down to 8 tokens."""
    originals = {job: [setting.rule for setting in layer_settings] for job, layer_settings in settings.items()}
    costs: dict[Job, dict[str, float]] = {}

    def force(job: Job, dense: bool) -> None:
        for setting in settings[job]:
            setting.rule = forced_selection(setting.num_experts, dense)

    try:
        with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
            first_of_kind: dict[Hashable, Job] = {}
            for job in settings:
                first = first_of_kind.setdefault(job if kind_of is None else kind_of[job], job)
                if first is not job:  # its kind's choice
                    force(job, costs[first]["dense"] >= costs[first]["dispatch"])
                    continue
                def measure(tokens: int, job: Job = job) -> None:
                    ids = torch.randint(0, vocab_size, (2, tokens), device=device)
                    costs[job] = {}
                    for name, dense in (("dispatch", False), ("dense", True)):
                        force(job, dense)
                        run_step(ids, [job, job])
                        costs[job][name] = step_memory(device, lambda ids=ids, job=job: run_step(ids, [job, job]))

                tokens = halving_on_oom(measure, length, "a DynMoLE profiling step of %d tokens per row ran out of "
                                        "memory; measuring again at %d")
                costs[job]["tokens"] = tokens  # (the length measured: the fit need not start longer)
                force(job, costs[job]["dense"] >= costs[job]["dispatch"])
        yield costs
    finally:
        for job, rules in originals.items():
            for setting, rule in zip(settings[job], rules, strict=True):
                setting.rule = rule


def measures_resident(device: torch.device | str) -> bool:
    """Whether `step_memory` on `device` counts what the jobs keep between steps (their gradient buffers and
    optimizer states): the CUDA allocator's peak holds every live tensor; the CPU's saved-activation bytes hold
    none of them."""
    return torch.device(device).type == "cuda"


def step_memory(device: torch.device, run_step) -> float:
    """Peak bytes of `run_step()`: CUDA allocator peak on a GPU, else saved-activation bytes (see module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device))
    with activation_bytes() as meter:
        run_step()
    return float(meter["bytes"])


def first_step_state_bytes(optimizer: torch.optim.Optimizer, tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the state `optimizer` creates at its first step for `tensors` (what the budget counts for a job
    that has not stepped yet), per kind of optimizer:

    - SGD: one buffer like the tensor with momentum, none without; Adam/AdamW: two (three with AMSGrad);
      Adagrad: one; RMSprop: one, one more with momentum and one more when centered;
    - transformers' Adafactor: a float32 row and column second moment for a matrix (for a tensor of 3 or more
      dimensions, one of each per matrix), a full one for a vector, and a float32 first moment with `beta1`;
    - bitsandbytes: two moments (one for Lion), of one byte per element in the 8-bit kinds (4 for tensors under
      their 4096-element threshold, kept in 32 bits), else of 4;
    - any other: two buffers like the tensor (a cautious guess; the budget then defers rather than overflows).
    """
    groups = optimizer.param_groups
    has = lambda key: any(group.get(key) for group in groups)  # noqa: E731
    like = sum(t.nbytes for t in tensors)
    name, module = type(optimizer).__name__, type(optimizer).__module__
    if module.startswith("bitsandbytes"):
        moments = 1 if "Lion" in name else 2
        if "8bit" in name:
            return moments * sum(t.numel() if t.numel() >= 4096 else 4 * t.numel() for t in tensors)
        return moments * 4 * sum(t.numel() for t in tensors)
    if isinstance(optimizer, torch.optim.SGD):
        return like if has("momentum") else 0
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return (3 if has("amsgrad") else 2) * like
    if isinstance(optimizer, torch.optim.Adagrad):
        return like
    if isinstance(optimizer, torch.optim.RMSprop):
        return (1 + has("momentum") + has("centered")) * like
    if name == "Adafactor":  # (float32 whatever the tensor's dtype: it steps on the gradient cast to float32)
        second = sum(4 * (math.prod(t.shape[:-1]) + math.prod(t.shape[:-2]) * t.shape[-1]) if t.dim() >= 2
                     else 4 * t.numel() for t in tensors)
        first = 4 * sum(t.numel() for t in tensors)
        return second + (first if any(group.get("beta1") is not None for group in groups) else 0)
    return 2 * like
