"""Mixed-adapter batches: the rows of several jobs in one batch, each job's rows contiguous, one adapter per row.

Every frozen base operation then runs once for all rows, and each adapter only on its own rows (contiguous rows
are sliced, not gathered, by the peft-mole layers). A plain-LoRA job's micro-batch may also be cut into its rows
(`row_lengths`, `take_rows`), so the scheduler can put rows of very different lengths into different steps.

With TRL's `padding_free=True` every job's micro-batch is already one packed row (its sequences concatenated,
position ids restarting at 0 for each); `packed_mixed_batch` concatenates those rows into one, with one adapter
name per token, so a mixed step has no padding at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peft_mole.forward_context import packed_real_tokens
from peft_mole.packed_attention import sequence_bounds


@dataclass
class MixedBatch:
    input_ids: torch.Tensor  # (rows, seq), right-padded; (1, tokens) when packed
    attention_mask: torch.Tensor | None  # (rows, seq); None when packed
    labels: torch.Tensor  # (rows, seq), -100 on padding, untrained tokens and (packed) every sequence's first token
    adapter_names: list[str]  # one per row; one per token when packed
    rows: dict[str, slice]  # job -> its rows; its tokens when packed
    position_ids: torch.Tensor | None = None  # (1, tokens) when packed: 0 at the start of every sequence

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    def index(self, job: str) -> tuple[slice, ...]:
        """Index of the job's part of any (rows, seq, ...) tensor of this batch (logits, per-token losses)."""
        return (slice(None), self.rows[job]) if self.packed else (self.rows[job],)

    def share(self, job: str) -> float:
        """The job's fraction of the batch's positions."""
        span = self.rows[job]
        return (span.stop - span.start) / (self.input_ids.shape[1] if self.packed else self.input_ids.shape[0])

    def model_inputs(self) -> dict:
        """Keyword arguments for the PEFT model's forward (labels are left to `per_job_losses`)."""
        if not self.packed:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                    "adapter_names": self.adapter_names}
        # sequence boundaries, as TRL's padding-free collator gives them, for varlen attention kernels (and each
        # token's sequence index, for the short convolutions of linear-attention layers); transformers
        # builds SDPA's block-diagonal causal mask from the position ids (with no attention mask and no cache)
        # a sequence starts where a position does not follow its predecessor's, as transformers finds them, and at
        # each job's first token (until 2026-12-07 only at position 0: a job whose positions did not start at 0
        # shared a sequence with the job before it, and attended to it under `sdpa_packed`)
        tokens = self.position_ids.shape[1]
        bounds = sorted({*sequence_bounds(self.position_ids, tokens, True), *(s.start for s in self.rows.values())})
        cu_seq_lens = torch.tensor(bounds, dtype=torch.int32, device=self.position_ids.device)
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
        longest = max(lengths)
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))[None]
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "adapter_names": self.adapter_names,
                "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
                "max_length_q": longest, "max_length_k": longest, "seq_idx": seq_idx.to(self.input_ids.device)}


def is_packed(batch: dict) -> bool:
    """A padding-free micro-batch (TRL's `padding_free=True`): one row, position ids, no attention mask."""
    ids, positions = batch.get("input_ids"), batch.get("position_ids")
    return (batch.get("attention_mask") is None and isinstance(positions, torch.Tensor) and isinstance(ids, torch.Tensor)
            and ids.dim() == 2 and ids.shape[0] == 1 and positions.shape == ids.shape)


def strip_padding(batch: dict) -> dict:
    """A padding-free micro-batch without the pads TRL's collator appends for `pad_to_multiple_of` (position id 0,
    label -100, after the last token of position > 0: `forward_context.packed_real_tokens`), so that a mixed step's
    packed row holds real tokens only, wherever a job's part lies in it. Other batches are returned as they are."""
    if not is_packed(batch):
        return batch
    real = packed_real_tokens(batch["position_ids"])
    if real is None:
        return batch
    end = int(real.sum())
    return {key: batch[key][:, :end] for key in ("input_ids", "labels", "position_ids") if key in batch}


def packed_mixed_batch(parts: dict[str, dict[str, torch.Tensor]]) -> MixedBatch:
    """Concatenate per-job packed micro-batches {job: {"input_ids", "labels", "position_ids"}, each (1, T_j)} into one
    packed row of Σ T_j tokens, each job's tokens contiguous: no padding. The label of every sequence's first token
    is set to -100, so the shifted next-token targets never cross from one sequence (or job) into the next."""
    if not parts:
        raise ValueError("parts must hold at least one job's batch")
    for job, part in parts.items():
        if not is_packed(part) or "labels" not in part:
            raise ValueError(
                f"the batch of job {job!r} is not a padding-free batch (input_ids, labels and position_ids of shape "
                "(1, tokens), no attention_mask); all jobs' micro-batches must be packed, or none"
            )
    positions = torch.cat([part["position_ids"] for part in parts.values()], dim=1)
    names, rows, start = [], {}, 0
    for job, part in parts.items():
        n = part["input_ids"].shape[1]
        names += [job] * n
        rows[job] = slice(start, start + n)
        start += n
    labels = torch.cat([part["labels"] for part in parts.values()], dim=1).masked_fill(positions == 0, -100)
    labels[0, [span.start for span in rows.values()]] = -100  # each job's first token: no target of the job before
    ids = torch.cat([part["input_ids"] for part in parts.values()], dim=1)
    return MixedBatch(ids, None, labels, names, rows, positions)


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


def pad_token_id(processing_class) -> int:
    """The tokenizer's pad token id (a processor's tokenizer's), 0 without one."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else pad


def mix(parts: dict[str, dict[str, torch.Tensor]], pad_token_id: int = 0, job_order=None) -> MixedBatch:
    """`packed_mixed_batch` for padding-free micro-batches, else `mixed_batch`. Packed parts are concatenated in
    `job_order` (the model's job names) where given: a compiled step's layers then take each job's tokens as one
    segment, with no permutation (`ForwardContext.segments`)."""
    if is_packed(next(iter(parts.values()))):
        if job_order is not None:
            position = {job: i for i, job in enumerate(job_order)}
            parts = dict(sorted(parts.items(), key=lambda item: position.get(item[0], len(position))))
        return packed_mixed_batch(parts)
    return mixed_batch(parts, pad_token_id)


def profile_inputs(ids: torch.Tensor, row_jobs: list[str], packed: bool, job_order=None) -> dict:
    """Forward keyword arguments, labels included, of a synthetic memory-profiling step
    (`MemoryModel.fit_by_profiling`): `ids` (rows, length), row i of job `row_jobs[i]`, as right-padded rows whose
    last row ends in one padding token (so transformers builds and SDPA keeps the (rows, 1, L, L) mask a mixed step
    of rows of several lengths keeps: with every token real it builds none, and the model under-predicted such
    steps, 17 % on the tiny model), or (`packed`) as the padding-free micro-batches of those jobs concatenated by
    `mix` into one packed row, in `job_order`. There each row holds two sequences (its halves), as a padding-free
    micro-batch holds several: transformers then builds the block-diagonal mask a packed step keeps (a row of one
    sequence needs none; on the tiny test model two sequences of 256 tokens keep 2.1 MB more than one of 512)."""
    if not packed:
        mask, labels = torch.ones_like(ids), ids.clone()
        if ids.shape[1] > 1:
            mask[-1, -1], labels[-1, -1] = 0, -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "adapter_names": list(row_jobs)}
    parts: dict[str, list[torch.Tensor]] = {}
    for row, job in zip(ids, row_jobs, strict=True):
        parts.setdefault(job, []).append(row)
    half = ids.shape[1] // 2
    positions = torch.cat([torch.arange(half), torch.arange(ids.shape[1] - half)]).to(ids.device)
    mixed = mix({job: {"input_ids": torch.cat(rows)[None], "labels": torch.cat(rows)[None],
                       "position_ids": positions.repeat(len(rows))[None]} for job, rows in parts.items()},
                job_order=job_order)
    return {**mixed.model_inputs(), "labels": mixed.labels}


def batch_inputs(batch: dict, job: str) -> dict:
    """Forward keyword arguments (labels aside) of one job's own micro-batch, padded or packed."""
    if is_packed(batch):
        return {**packed_mixed_batch({job: batch}).model_inputs(), "adapter_names": [job]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "adapter_names": [job] * batch["input_ids"].shape[0]}


def widths_differ(batches: list[dict]) -> bool:
    """Whether the jobs' micro-batches differ in width (padded length; tokens when packed). Then the mixed steps
    built from them vary in rows and length, and compiled steps take both dynamic from the first graph
    (`MultiJobModel.dynamic_steps`; MultiJobTrainer's first round, without a memory budget); where they do not (one
    job in the round, data of one length), Dynamo's own rule, whose static first graph compiles sooner."""
    return len({batch["input_ids"].shape[-1] for batch in batches if "input_ids" in batch}) > 1


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


def row_ends(attention_mask: torch.Tensor) -> torch.Tensor:
    """(rows,) the last real position of each row of a (rows, seq) attention mask, + 1 (0 for an empty row)."""
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)


PIECE_ROWS = "piece_rows"  # a cut micro-batch's entry: each row's index in the whole micro-batch (`take_rows`)


def take_rows(batch: dict, rows: list[int], length: int) -> dict:
    """Rows `rows` of a right-padded micro-batch, cut to its first `length` positions (at least every chosen row's
    real length: only padding is dropped). All rows at full length give the batch itself. A piece keeps each row's
    index in the whole micro-batch under `PIECE_ROWS` (pieces of pieces too), so its rows draw their dropout as
    they do whole (`MultiJobModel.drawing_pieces`)."""
    if rows == list(range(batch["input_ids"].shape[0])) and length == batch["input_ids"].shape[1]:
        return batch
    index = torch.tensor(rows, device=batch["input_ids"].device)
    piece = {key: value.index_select(0, index)[:, :length] if value.dim() > 1 else value.index_select(0, index)
             for key, value in batch.items() if key != PIECE_ROWS}
    # on the host, where the trainer reads it
    piece[PIECE_ROWS] = torch.tensor(rows) if PIECE_ROWS not in batch else batch[PIECE_ROWS][torch.tensor(rows)]
    return piece


def _take_tokens(batch: dict, part: slice) -> dict:
    """Tokens `part` of a packed micro-batch; as `take_rows` does for rows, each token's index in the whole packed
    micro-batch is kept under `PIECE_ROWS` (a packed batch's layers see each token as a row: `unit_view`)."""
    piece = {key: value[:, part] for key, value in batch.items() if key in ("input_ids", "labels", "position_ids")}
    whole = batch[PIECE_ROWS] if PIECE_ROWS in batch else torch.arange(batch["input_ids"].shape[1])
    piece[PIECE_ROWS] = whole[part]
    return piece


def row_halves(batch: dict) -> tuple[dict, dict] | None:
    """A right-padded micro-batch's rows in two halves, each cut to its longest row; a packed one's sequences in two
    halves of about equal tokens. Each half keeps its rows' (tokens') indices in the whole (`PIECE_ROWS`). None for
    one row (one sequence) or rows that cannot be cut apart (`row_lengths`)."""
    if is_packed(batch):
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        if len(starts) < 2 or starts[0] != 0:
            return None
        middle = min(starts[1:], key=lambda start: abs(2 * start - batch["input_ids"].shape[1]))
        return tuple(_take_tokens(batch, part) for part in (slice(0, middle), slice(middle, None)))
    lengths = row_lengths(batch)
    if lengths is None or len(lengths) < 2:
        return None
    middle = len(lengths) // 2
    return tuple(take_rows(batch, list(rows), max(lengths[rows.start:rows.stop]))
                 for rows in (range(0, middle), range(middle, len(lengths))))
