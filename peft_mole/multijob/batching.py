"""Mixed-adapter batches: the rows of several jobs in one batch, each job's rows contiguous, one adapter per row.

Every frozen base operation then runs once for all rows, and each adapter only on its own rows (contiguous rows
are sliced, not gathered, by the peft-mole layers). A plain-LoRA job's micro-batch may also be cut into its rows
(`row_lengths`, `take_rows`), so the scheduler can put rows of very different lengths into different steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MixedBatch:
    input_ids: torch.Tensor  # (rows, seq), right-padded
    attention_mask: torch.Tensor  # (rows, seq)
    labels: torch.Tensor  # (rows, seq), -100 on padding and untrained tokens
    adapter_names: list[str]  # one per row
    rows: dict[str, slice]  # job -> its rows

    def model_inputs(self) -> dict:
        """Keyword arguments for the PEFT model's forward (labels are left to `per_job_losses`)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "adapter_names": self.adapter_names}


def mixed_batch(parts: dict[str, dict[str, torch.Tensor]], pad_token_id: int = 0) -> MixedBatch:
    """Stack per-job batches {job: {"input_ids", "attention_mask", "labels"}} into one right-padded batch.

    Job names are adapter names. Each part may have its own length; shorter rows are padded on the right
    (pad_token_id, attention 0, label -100), so no real token sees a pad token under causal attention.
    """
    if not parts:
        raise ValueError("parts must hold at least one job's batch")
    for job, part in parts.items():
        missing = {"input_ids", "attention_mask", "labels"} - set(part)
        if missing:
            raise ValueError(f"the batch of job {job!r} lacks {sorted(missing)}")
    length = max(part["input_ids"].shape[1] for part in parts.values())

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    ids, mask, labels, names, rows, start = [], [], [], [], {}, 0
    for job, part in parts.items():
        n = part["input_ids"].shape[0]
        ids.append(pad(part["input_ids"], pad_token_id))
        mask.append(pad(part["attention_mask"], 0))
        labels.append(pad(part["labels"], -100))
        names += [job] * n
        rows[job] = slice(start, start + n)
        start += n
    return MixedBatch(torch.cat(ids), torch.cat(mask), torch.cat(labels), names, rows)


def row_lengths(batch: dict) -> list[int] | None:
    """Real length of each row of a right-padded micro-batch, or None when its rows cannot be cut apart (left
    padding, no attention mask, a tensor that is not laid out (rows, seq, ...) or (rows,), or labels other than
    -100 on padding)."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    rows, seq = mask.shape
    for value in batch.values():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != rows or (
            value.dim() > 1 and value.shape[1] != seq
        ):
            return None
    lengths = mask.sum(dim=1)
    real = torch.arange(seq, device=mask.device) < lengths[:, None]
    if not torch.equal(mask.bool(), real):
        return None
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2 and (labels[~real] != -100).any():
        return None  # trained labels on padding: cutting them off would change the job's token count
    return [max(int(n), 1) for n in lengths]


def take_rows(batch: dict, rows: list[int], length: int) -> dict:
    """Rows `rows` of a right-padded micro-batch, cut to its first `length` positions (at least every chosen row's
    real length: only padding is dropped). All rows at full length give the batch itself."""
    if rows == list(range(batch["input_ids"].shape[0])) and length == batch["input_ids"].shape[1]:
        return batch
    index = torch.tensor(rows, device=batch["input_ids"].device)
    return {key: value.index_select(0, index)[:, :length] if value.dim() > 1 else value.index_select(0, index)
            for key, value in batch.items()}


def row_halves(batch: dict) -> tuple[dict, dict] | None:
    """A right-padded micro-batch's rows in two halves, each cut to its longest row; None for one row or rows that
    cannot be cut apart (`row_lengths`)."""
    lengths = row_lengths(batch)
    if lengths is None or len(lengths) < 2:
        return None
    middle = len(lengths) // 2
    return tuple(take_rows(batch, list(rows), max(lengths[rows.start:rows.stop]))
                 for rows in (range(0, middle), range(middle, len(lengths))))
