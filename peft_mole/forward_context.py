"""State one forward pass shares between the tuner and its layers.

A tuner owns one `ForwardContext`; every layer it creates holds a reference to it. Each call sets it afresh:
`PeftModel.forward/generate` (through the tuner's `_enable_peft_forward_hooks`) or a direct tuner call sets the
per-row adapter names (or, for a packed batch, one per token: see `unit_view`); the tuner's forward sets the
non-padding token mask and starts recording router statistics, and stops recording when it returns, so no
statistic carries over from one call to the next (MoE-PEFT issue #14). Row assignment and mask stay in place
until the next call on purpose: activation checkpointing re-runs the layers during backward and must see the same
rows as the forward did. A call of the base model itself (`model.get_base_model()(...)`), which neither sets them,
runs the active adapter on every row (`MixLoRAModel._base_called`).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import torch

BASE_ROW = "__base__"  # a row that runs through the frozen base only (PEFT's name for it in mixed batches)


@dataclass
class RowGroup:
    """Rows of a batch that use one adapter: `rows` is a slice when they are contiguous, else an index tensor."""

    adapter: str
    rows: slice | torch.Tensor
    num_rows: int


@dataclass
class RouterRecord:
    """Router output of one MoE layer for the non-padding tokens of one adapter."""

    layer: str
    adapter: str
    probs: torch.Tensor  # (T, E) fp32, with grad
    selected: torch.Tensor  # (T, E) bool
    token_mask: torch.Tensor | None  # (T,) bool, True = real token; None = all tokens count
    # a per-row block's record: `probs` holds every job's columns, this adapter's are `columns`, its tokens those
    # of `token_mask`. Taken when read (`adapter_probs`), outside the layer: an autograd op recorded inside would
    # be saved in the forward and not in activation checkpointing's recomputation, which runs without recording
    columns: slice | None = None

    @property
    def masked(self) -> bool:
        """loss_inputs keeps every row and the mask (per-row blocks: no read-back of the rows)."""
        return self.columns is not None

    def adapter_probs(self) -> torch.Tensor:
        """(T, E) this adapter's router probabilities: `probs`, or a per-row block's columns of it, 0 on other
        tokens (whose values may be NaN where their own router failed: `where` keeps 0 · NaN out of this loss)."""
        if self.columns is None:
            return self.probs
        return torch.where(self.token_mask.unsqueeze(1), self.probs[:, self.columns], 0.0)

    def counted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs, selected) of the tokens that count (padding removed)."""
        if self.token_mask is None:
            return self.adapter_probs(), self.selected
        rows = self.token_mask.nonzero().squeeze(1)  # read back once (a host sync on a GPU) for both tensors
        return self.adapter_probs().index_select(0, rows), self.selected.index_select(0, rows)

    def loss_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(probs, selected, token_mask) for an aux loss (`layer_aux_loss`): padding removed, mask None; under
        torch.compile every row and the mask of those that count, as removing rows would break the graph."""
        if (self.masked or torch.compiler.is_compiling()) and self.token_mask is not None:
            return self.adapter_probs(), self.selected, self.token_mask
        return (*self.counted(), None)


@dataclass(frozen=True)
class PackedSegments:
    """The job segments of a packed batch in a compiled multi-job step: `ends` (jobs + 1 of them, the base slot
    last) bounds each job's tokens among the tokens sorted by job, and `order` (order, inverse) permutes the
    tokens to and from that sorting; None where they are in job order already. Computed on the host from the
    adapter names, so no layer reads anything back."""

    ends: torch.Tensor
    order: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, token_jobs: list[int], slots: int, device: torch.device) -> PackedSegments:
        """The segments of tokens whose job indices (in 0 .. slots - 1) are `token_jobs`."""
        counts = [0] * slots
        for job in token_jobs:
            counts[job] += 1
        ends = torch.tensor(list(itertools.accumulate(counts)), device=device)
        if all(earlier <= later for earlier, later in itertools.pairwise(token_jobs)):
            return cls(ends)
        order = sorted(range(len(token_jobs)), key=token_jobs.__getitem__)  # stable
        inverse = [0] * len(order)
        for position, token in enumerate(order):
            inverse[token] = position
        return cls(ends, (torch.tensor(order, device=device), torch.tensor(inverse, device=device)))

    def to(self, device: torch.device) -> PackedSegments:
        """The same segments on `device` (no-ops unless the model is split over devices)."""
        order = None if self.order is None else tuple(t.to(device) for t in self.order)
        return PackedSegments(self.ends.to(device), order)


def real_tokens(attention_mask) -> torch.Tensor | None:
    """(batch, seq) bool mask of the real tokens of a 2-D attention mask; None (every token counts) for none, or for
    another form (a 4-D mask)."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask.bool()
    return None


def check_attention_mask(args: tuple, kwargs: dict) -> None:
    """Refuse a 2-D attention mask (in a model call's `args`/`kwargs`) that does not have one row per sequence and at
    least one column per token (under cached decoding it has more: the past tokens'), before a layer slices it: a
    shorter one made DynMoLE fail deep in a layer and MixLoRA count the router statistics of the wrong tokens."""
    attention_mask, inputs_embeds = kwargs.get("attention_mask"), kwargs.get("inputs_embeds")
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    tokens = input_ids if isinstance(input_ids, torch.Tensor) else inputs_embeds
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and isinstance(tokens, torch.Tensor) and tokens.dim() >= 2):
        return
    batch, seq_len = tokens.shape[0], tokens.shape[1]
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < seq_len:
        name = "input_ids" if tokens is input_ids else "inputs_embeds"
        raise ValueError(f"attention_mask must have {batch} rows and at least {seq_len} columns for {name} of shape "
                         f"{tuple(tokens.shape)} (more only for past tokens), got {tuple(attention_mask.shape)}")


def packed_real_tokens(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(1, T) bool mask of a padding-free row's real tokens, or None where none is padding. TRL's padding-free
    collator pads the packed row on the right (`pad_to_multiple_of`) with position id 0 and label -100, so each pad
    reads as a sequence of one token: the tokens after the last one of position > 0 are padding (a real sequence
    of one token there, which has no target, is not told apart). Eagerly, one read-back (a sync on a GPU) decides
    whether there are any; under torch.compile the mask is computed on the device, without a read-back (all True
    where there are none)."""
    positions = position_ids[0]
    if positions.shape[0] == 0:
        return None
    index = torch.arange(positions.shape[0], device=positions.device)
    last = torch.where(positions > 0, index, -1).max()
    if torch.compiler.is_compiling():
        return ((index <= last) | (last < 0))[None]
    last = int(last)
    if last < 0 or last == positions.shape[0] - 1:
        return None
    return (index <= last)[None]


@dataclass(eq=False)  # (compared and hashed by identity: `LIVE_CONTEXTS`)
class ForwardContext:
    row_adapters: list[str] | None = None
    token_mask: torch.Tensor | None = None  # (batch, seq) bool, True = real token
    records: list[RouterRecord] | None = None  # None = do not record
    rows_set_by_hook: bool = False  # row_adapters were set for the call now starting
    in_tuner_call: bool = False  # the tuner's forward is running the base (`MixLoRAModel._base_called`)
    check_finite: int = 0  # `peft_mole.check_finite` contexts on (nested ones count): layers check router logits
    # compiled multi-job steps (`MultiJobModel.compile_mixed_steps`): the jobs in a fixed order and, per row, the
    # index of its job in `jobs` (len(jobs) for a base-only row), so that LoRA layers take the composition as data
    jobs: tuple[str, ...] = ()
    row_jobs: torch.Tensor | None = None
    # a packed batch (one row, one adapter per token): `row_jobs` holds one job index per token, and `segments`
    # the job segments of its tokens; None for any other batch
    segments: PackedSegments | None = None
    _groups: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        LIVE_CONTEXTS.add(self)

    def rows(self) -> dict:
        """What a forward's rows set here (`ROW_FIELDS`): activation checkpointing's recomputation of a layer must
        see its own forward's, also when another forward set them since (`ops.stream_checkpoint`)."""
        return {name: getattr(self, name) for name in ROW_FIELDS}

    def set_rows(self, rows: dict) -> None:
        """Put back what `rows()` returned."""
        for name, value in rows.items():
            setattr(self, name, value)

    def set_row_adapters(self, names: list[str] | None, by_hook: bool = False) -> None:
        self.row_adapters = None if names is None else list(names)
        self.rows_set_by_hook = by_hook
        self.row_jobs = self.segments = None  # made again by the tuner's forward (compiled multi-job steps)
        self._groups = {}

    def unit_view(self, x: torch.Tensor) -> torch.Tensor:
        """x (1, T, features) as (T, 1, features) when the batch is packed: one row holding several sequences (TRL's
        `padding_free`, position ids restarting at 0 for each), with one adapter name per token. Layers group its
        tokens, not its rows, by adapter; every other x is returned as is."""
        if x.dim() == 3 and self.names_per_token(x.shape[0], x.shape[1]):
            return x.view(x.shape[1], 1, x.shape[2])
        return x

    def names_per_token(self, batch_size: int, seq_len: int) -> bool:
        """Whether the adapter names are one per token of a packed batch (one row of several sequences)."""
        names = self.row_adapters
        return names is not None and len(names) > 1 and batch_size == 1 and seq_len == len(names)

    def row_groups(self, batch_size: int, active: list[str], device: torch.device) -> list[RowGroup]:
        """Group the batch rows by adapter (in order of first appearance)."""
        if self.row_adapters is None:
            if len(active) != 1:
                raise ValueError(
                    f"peft-mole layers run one adapter per row; {len(active)} adapters are active ({active}). "
                    "Call set_adapter(<one name>) or pass adapter_names=[one name per row] to the forward (or to "
                    "PeftModel.generate)."
                )
            return [RowGroup(active[0], slice(0, batch_size), batch_size)]
        if len(self.row_adapters) != batch_size:
            raise ValueError(
                f"adapter_names has {len(self.row_adapters)} entries but the batch has {batch_size} rows; "
                "pass exactly one adapter name per row (or, for a packed batch of one row, one per token; in "
                "generate, one per input row: num_beams and num_return_sequences are read from its keywords or "
                "its generation_config= keyword, not from the model's default generation config)"
            )
        key = (batch_size, str(device))
        if key not in self._groups:
            self._groups[key] = _group_rows(self.row_adapters, device)
        return self._groups[key]

    def tokens_to_record(self, batch_size: int, seq_len: int) -> torch.Tensor | None:
        """(batch, seq) bool mask of the tokens whose router statistics count, or None for all of them. A packed
        row with a name per token, which the layers see as (T, 1) (`unit_view`), gets its (1, T) mask as (T, 1)
        (before 2026-12-07 None: its trailing pads counted in the aux loss and router statistics)."""
        mask = self.token_mask
        if seq_len == 1 and mask is not None and mask.shape == (1, batch_size) and self.names_per_token(1, batch_size):
            mask = mask.reshape(batch_size, 1)  # as `unit_view` shapes the row
        if mask is None or mask.dim() != 2 or mask.shape[0] != batch_size:
            return None
        if mask.shape[1] != seq_len:  # cached decoding: the mask also covers past tokens
            mask = mask[:, -seq_len:]
        return mask


ROW_FIELDS = ("row_adapters", "token_mask", "rows_set_by_hook", "jobs", "row_jobs", "segments", "_groups")
LIVE_CONTEXTS: weakref.WeakSet[ForwardContext] = weakref.WeakSet()  # every tuner's context (one per tuner)


def _group_rows(names: list[str], device: torch.device) -> list[RowGroup]:
    order: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        order.setdefault(name, []).append(i)
    groups = []
    for name, rows in order.items():
        if rows[-1] - rows[0] + 1 == len(rows):
            groups.append(RowGroup(name, slice(rows[0], rows[-1] + 1), len(rows)))
        else:
            groups.append(RowGroup(name, torch.tensor(rows, device=device), len(rows)))
    return groups
