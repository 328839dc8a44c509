"""What a killed write leaves in a job's folder is removed by the next write, and every rename a write relies on is
flushed to disk, its folder included (`multijob.checkpoint`; found by a review on 2026-12-08)."""

from __future__ import annotations

import os
import stat

import pytest

from peft_mole.multijob import checkpoint
from peft_mole.multijob.checkpoint import (
    prune_checkpoints,
    remove_leftovers,
    replace_files_atomically,
    write_atomically,
    write_json,
)


def _leave_leftovers(job_dir) -> None:
    """What a SIGKILL leaves: a final write's staging folder, a JSON file's temporary copy, a checkpoint's."""
    (job_dir / ".tmp-final-abc").mkdir(parents=True, exist_ok=True)
    (job_dir / ".tmp-final-abc" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (job_dir / ".tmp-run.json-xyz").write_text("{")
    (job_dir / ".tmp-checkpoint-3-q").mkdir(exist_ok=True)


def test_a_final_write_and_a_prune_remove_what_a_killed_write_left(tmp_path):
    """A job's final write (`lifecycle._finish`, on process zero) clears a killed final write's and JSON files'
    leftovers, a prune after a checkpoint every kind."""
    job = tmp_path / "job"
    _leave_leftovers(job)
    remove_leftovers(str(job), checkpoints=False)
    replace_files_atomically(str(job), lambda d: open(os.path.join(d, "job_state.json"), "w").write("{}"))
    assert sorted(os.listdir(job)) == [".tmp-checkpoint-3-q", "job_state.json"]  # (a checkpoint's: the prune's)
    _leave_leftovers(job)
    prune_checkpoints(str(job), keep=None)
    assert sorted(os.listdir(job)) == ["job_state.json"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a flushed folder by /proc/self/fd")
def test_every_write_flushes_the_folder_its_rename_lands_in(tmp_path, monkeypatch):
    flushed_dirs, real_fsync = [], os.fsync

    def recording(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            flushed_dirs.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", recording)
    job = tmp_path / "job"
    write_atomically(str(job / "checkpoint-1"), lambda d: open(os.path.join(d, "job_state.json"), "w").write("{}"))
    assert str(job) in flushed_dirs  # the folder that holds the renamed checkpoint
    flushed_dirs.clear()
    replace_files_atomically(str(job), lambda d: open(os.path.join(d, "job_state.json"), "w").write("{}"))
    assert str(job) in flushed_dirs
    flushed_dirs.clear()
    write_json(str(job / "run.json"), {"run_id": "r"})
    assert flushed_dirs == [str(job)]
