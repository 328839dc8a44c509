"""Atomic per-job checkpoints: `output_dir/<job>/checkpoint-N/` appears complete or not at all.

A checkpoint is written into a hidden temporary folder next to its final place, flushed to disk, then renamed
(`os.replace` is atomic on one filesystem). A crash (kill -9, full disk) while writing leaves at most a
`.tmp-checkpoint-*` folder behind, never a half-written checkpoint, and the previous checkpoints are untouched (a
step's checkpoint written again is swapped in with two renames; one a kill left between them is restored).
Readers only look at `checkpoint-N` folders that hold the `job_state.json` written last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable

from peft_mole.multijob.best_checkpoint import checkpoints_to_delete

STATE_FILE = "job_state.json"
# the run's logs of one job up to a checkpoint or its end (Trainer keeps them in trainer_state.json's log_history):
# a resume puts them back into `trainer.state.log_history`
LOG_FILE = "log_history.json"
RUN_FILE = "run.json"  # {"run_id": ...} of the run that last started in a job's folder (`lifecycle`)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _fsync_tree(path: str) -> None:
    """Flush every file under `path` and the folders that hold them to disk (a folder's entries are what a rename
    relies on; folders were not flushed before 2026-12-08)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    """Flush a folder's entries (a rename into or within it) to disk, where the platform can (not on Windows)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:  # a file system that cannot flush a folder
        pass
    finally:
        os.close(handle)


def remove_leftovers(job_dir: str, checkpoints: bool) -> None:
    """Remove what a killed write left in a job's folder: a final write's staging folder (`.tmp-final-*`), a JSON
    file's temporary copy (`.tmp-<name>.json-*`) and, with `checkpoints`, a checkpoint's (`.tmp-checkpoint-*`,
    `.old-checkpoint-*`; a checkpoint a kill left mid-swap is restored first). Only the world's process zero calls
    it, between its writes (the one writer: `save_on_each_node` is refused);
    before 2026-12-08 the first two stayed for good (a whole adapter's copy)."""
    for name in os.listdir(job_dir) if os.path.isdir(job_dir) else []:
        path = os.path.join(job_dir, name)
        checkpoint_copy = name.startswith((".tmp-checkpoint-", ".old-checkpoint-"))
        if name.startswith(".tmp-final-") or (checkpoints and checkpoint_copy):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".tmp-") and ".json-" in name and os.path.isfile(path):
            os.remove(path)


def _read_umask() -> int:
    umask = os.umask(0)  # (read once, at import: setting it is process-wide)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def write_atomically(final_dir: str, write: Callable[[str], None]) -> str:
    """Call write(tmp_dir), then move tmp_dir to `final_dir` in one rename. Returns final_dir.

    If `write` raises (disk full, ...) the temporary folder is removed and nothing at `final_dir` changes.
    """
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final_dir)}-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # a folder made as any other (mkdtemp's are private: 0700)
        write(tmp)
        _fsync_tree(tmp)
        if os.path.exists(final_dir):  # same step saved again (e.g. after resume): swap in the new one
            old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(final_dir)}-", dir=parent)
            os.replace(final_dir, os.path.join(old, "x"))
            os.replace(tmp, final_dir)
            _fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final_dir)
            _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


def replace_files_atomically(target_dir: str, write: Callable[[str], None]) -> None:
    """Write files into a temporary folder, then move each into `target_dir` with an atomic rename.

    For the final adapter in `output_dir/<job>/`, a folder that also holds the checkpoints: each file is replaced
    whole (the weights first, the configs after them, `job_state.json` last), so a reader never sees a truncated
    file, and a folder whose `job_state.json` says the job ended holds every other file of that write (a kill
    between two renames leaves the old state, and resume writes the folder again).
    """
    os.makedirs(target_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-final-", dir=target_dir)
    try:
        write(tmp)
        _fsync_tree(tmp)
        names = sorted(os.listdir(tmp),
                       key=lambda n: (n == STATE_FILE, n.endswith(".json"), not n.endswith(".safetensors"), n))
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(target_dir, name))
        _fsync_dir(target_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore_swapped(job_dir: str) -> None:
    """Put back a checkpoint that a kill left between `write_atomically`'s two renames: when a step's checkpoint is
    written again, the complete old one moves to `.old-checkpoint-N-*/x` before the new one takes its name; a kill
    in between leaves no `checkpoint-N`. The old one (complete: it was listed) goes back to its name."""
    for name in os.listdir(job_dir):
        if not name.startswith(".old-checkpoint-"):
            continue
        final = os.path.join(job_dir, name[len(".old-"):].rsplit("-", 1)[0])  # (mkdtemp's suffix has no "-")
        kept = os.path.join(job_dir, name, "x")
        if _CHECKPOINT.match(os.path.basename(final)) and not os.path.exists(final) and os.path.isfile(
            os.path.join(kept, STATE_FILE)
        ):
            try:
                os.replace(kept, final)
            except OSError:  # another process restored it first
                continue


def list_checkpoints(job_dir: str, run_id: str | None = None) -> list[tuple[int, str]]:
    """Complete checkpoints of a job, oldest first: [(step, path)] (one a kill left mid-swap restored first); with
    `run_id`, those of that run only (a run with an id writes it into each of its checkpoints, so one without it is
    an earlier run's)."""
    if not os.path.isdir(job_dir):
        return []
    _restore_swapped(job_dir)
    found = []
    for name in os.listdir(job_dir):
        match = _CHECKPOINT.match(name)
        path = os.path.join(job_dir, name)
        state = os.path.join(path, STATE_FILE)
        if match and os.path.isfile(state) and (run_id is None or read_json(state).get("run_id") == run_id):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(job_dir: str, run_id: str | None = None) -> str | None:
    found = list_checkpoints(job_dir, run_id)
    return found[-1][1] if found else None


def prune_checkpoints(job_dir: str, keep: int | None, run_id: str | None = None, best: str | None = None) -> None:
    """Delete the oldest checkpoints of run `run_id` beyond `keep` (None or <= 0 keeps all; another run's are
    kept; the best one, folder name `best`, is kept besides: `best_checkpoint.checkpoints_to_delete`), and
    temporary folders a killed write left behind (called right after a write completed, by the only writer; a
    checkpoint a kill left mid-swap is restored, not deleted)."""
    if os.path.isdir(job_dir):
        _restore_swapped(job_dir)
    remove_leftovers(job_dir, checkpoints=True)
    for path in checkpoints_to_delete([path for _, path in list_checkpoints(job_dir, run_id)], keep, best):
        shutil.rmtree(path, ignore_errors=True)


def write_json(path: str, data: dict) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it to `path`: a reader sees the
    old file or the new one whole (a full disk or a kill midway leaves the old one), as the checkpoints. A file
    there keeps its permissions; a symbolic link there keeps pointing to the file, which is replaced."""
    path = os.path.realpath(path)
    folder = os.path.dirname(path)
    mode = os.stat(path).st_mode & 0o777 if os.path.isfile(path) else 0o666 & ~_UMASK  # (mkstemp's: 0600)
    handle, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=folder)
    try:
        os.chmod(tmp, mode)
        with os.fdopen(handle, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
