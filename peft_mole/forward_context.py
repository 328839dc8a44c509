"""State one forward pass shares between the tuner and its layers.

A tuner owns one `ForwardContext`; every layer it creates holds a reference to it. The tuner fills it at the
start of a call (per-row adapter names, the non-padding token mask, whether to record router statistics) and
clears it at the end, so nothing carries over from one forward call to the next (MoE-PEFT issue #14).
Layers used outside a tuner call (e.g. inside `generate`) see an empty context: every row uses the active
adapter and nothing is recorded.
"""

from __future__ import annotations

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


@dataclass
class ForwardContext:
    row_adapters: list[str] | None = None
    token_mask: torch.Tensor | None = None  # (batch, seq) bool, True = real token
    records: list[RouterRecord] | None = None  # None = do not record
    _groups: dict = field(default_factory=dict)

    def clear(self) -> None:
        self.token_mask = None
        self.records = None
        self._groups = {}

    def set_row_adapters(self, names: list[str] | None) -> None:
        self.row_adapters = None if names is None else list(names)
        self._groups = {}

    def row_groups(self, batch_size: int, active: list[str], device: torch.device) -> list[RowGroup]:
        """Group the batch rows by adapter (in order of first appearance)."""
        if self.row_adapters is None:
            if len(active) != 1:
                raise ValueError(
                    f"peft-mole layers run one adapter per row; {len(active)} adapters are active ({active}). "
                    "Call set_adapter(<one name>) or pass adapter_names=[one name per row] to forward/generate."
                )
            return [RowGroup(active[0], slice(0, batch_size), batch_size)]
        if len(self.row_adapters) != batch_size:
            raise ValueError(
                f"adapter_names has {len(self.row_adapters)} entries but the batch has {batch_size} rows; "
                "pass exactly one adapter name per row"
            )
        key = (batch_size, str(device))
        if key not in self._groups:
            self._groups[key] = _group_rows(self.row_adapters, device)
        return self._groups[key]

    def tokens_to_record(self, batch_size: int, seq_len: int) -> torch.Tensor | None:
        """(batch, seq) bool mask of the tokens whose router statistics count, or None for all of them."""
        mask = self.token_mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != batch_size:
            return None
        if mask.shape[1] != seq_len:  # cached decoding: the mask also covers past tokens
            mask = mask[:, -seq_len:]
        return mask


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
