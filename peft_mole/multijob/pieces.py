"""Pieces of a micro-batch draw as the whole: a job's rows cut into several steps get the dropout masks they get
when the micro-batch runs in one step.

A plain-LoRA job's right-padded micro-batch may run in pieces: `JobScheduler.group_by_length` cuts it into rows of
similar lengths (`step_overhead_tokens`, by measured step times under "auto"), and an out-of-memory retry runs it
in two halves (`row_halves`); so does the retry of a MixLoRA or DynMoLE job's (`multijob.halves`), whose halves
run twice (without autograd for the whole's router loads, then trained), each time drawing as the whole. Both cut with `batching.take_rows`, which keeps each row's index r_i in the whole
micro-batch (`PIECE_ROWS`). A padding-free micro-batch's halves keep their tokens' indices: a packed row's layers
see each token as a row of width 1, so the same rule holds with tokens for rows. With the job's stream at state s_0
when its micro-batch's round begins, every piece

    restarts the stream at s_0 and takes rows [r_1, …, r_n] of the masks drawn for the whole (m, w, ...) batch

(`ops.dropout.stream_draw`, via `MultiJobModel.drawing_pieces`), so each row is dropped out as in the uncut run,
and the stream ends where the uncut run leaves it: the run repeats exactly however its micro-batches are cut
(docs/multijob.md, "Checkpoints, resume, failures"). Cost: a cut micro-batch draws its masks once per piece.
"""

from __future__ import annotations

from peft_mole.multijob.batching import PIECE_ROWS, is_packed, row_ends


class RoundStreams:
    """The jobs' micro-batches of one round and their streams' states as the round begins."""

    def __init__(self, parts: list[tuple], draws) -> None:
        """`parts`: the round's (JobRun, whole micro-batch) pairs; `draws(run)`: whether the job's state must be
        kept for its pieces (False only where the job is known to draw nothing: a LoRA job without dropout; a
        MixLoRA or DynMoLE job is kept whatever its dropout and jitter)."""
        self.starts = {run.name: (batch, run.stream.get_state()) for run, batch in parts
                       if run.stream is not None and draws(run)}
        self.widths: dict[str, int] = {}

    def _pieces(self, parts: list[tuple]) -> list[tuple]:
        return [(run, batch) for run, batch in parts if PIECE_ROWS in batch and run.name in self.starts]

    def restart(self, parts: list[tuple]) -> None:
        """Put the stream of every job whose part in `parts` is a piece back to its state at the round's start."""
        for run, _ in self._pieces(parts):
            run.stream.set_state(self.starts[run.name][1])

    def layouts(self, parts: list[tuple]) -> dict[str, tuple[list[int], int, int]]:
        """{job: (its rows' indices in the whole micro-batch, the whole's row count, the whole's own width)} for
        the jobs whose part in `parts` is a piece (`MultiJobModel.drawing_pieces`); each whole's width is read once
        a round."""
        layouts = {}
        for run, batch in self._pieces(parts):
            whole = self.starts[run.name][0]
            if is_packed(whole):  # its layers see each token as a row of width 1 (`ForwardContext.unit_view`)
                layouts[run.name] = (batch[PIECE_ROWS].tolist(), whole["input_ids"].shape[1], 1)
                continue
            if run.name not in self.widths:  # its longest row's last real token + 1 (a read-back on a GPU)
                self.widths[run.name] = int(row_ends(whole["attention_mask"]).max())
            layouts[run.name] = (batch[PIECE_ROWS].tolist(), whole["input_ids"].shape[0], self.widths[run.name])
        return layouts
