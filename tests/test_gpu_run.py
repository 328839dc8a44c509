"""bench/gpu_run.sh, the one call a GPU session makes (docs/gpu.md, "Next GPU session"), run here with `python3` and
`nvidia-smi` replaced by recorders: the parts run in the documented order with the documented commands, and
`GPU_DEADLINE_S` skips what would not fit. Device time is scarce; a part that would fail at once wastes it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_gpu_script(tmp_path, *parts: str, deadline: int = 100000, status: int = 0,
                   failing: str = "") -> tuple[list[str], str]:
    """The commands gpu_run.sh starts (one line each, as given to python3) and its machine.txt; it must end with
    `status` (1: a part failed or was skipped). The script `failing` exits 3."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    (bin_dir / "python3").write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n[ "$1" = "{failing}" ] && exit 3\nexit 0\n')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'a GPU, 80 GiB'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), GPU_DEADLINE_S=str(deadline))
    done = subprocess.run(["bash", "bench/gpu_run.sh", *parts], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == status, done.stderr
    if status:  # the failed or skipped parts come last
        last = done.stdout.splitlines()[-1]
        assert "left before GPU_DEADLINE_S" in last or ": exit 3 in " in last, last
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [line for line in lines if not line.startswith("-c ")], (out / "machine.txt").read_text()


def test_the_default_parts_run_new_figures_first_and_the_tests_file_of_the_rebounded_steps_first(tmp_path):
    calls, machine = run_gpu_script(tmp_path)
    scripts = [call.split()[0] if not call.startswith("-m pytest") else "pytest" for call in calls]
    assert scripts == ["bench/gpu_medium.py", "bench/multijob_speedup.py", "bench/profile_step.py", "pytest",
                       "bench/gpu_medium.py", "bench/multijob_speedup.py", "bench/generate_vs_base.py"], calls
    assert "--autocast bf16" in calls[0] and "--optim adamw_torch_fused --compare-layouts" in calls[1]
    tests = calls[3].split()
    files = [arg for arg in tests if arg.startswith("tests/")]
    assert files[0] == "tests/gpu/test_cuda_paths.py" and "-v" in tests
    assert sorted(files) == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "gpu").glob("test_*.py"))
    assert machine.count(": exit 0 in ") == 7


def test_the_fused_chain_part_times_flat_routers_and_the_deadline_skips_parts(tmp_path):
    calls, _ = run_gpu_script(tmp_path, "fused_chain")
    assert calls == ["bench/fused_chain.py --shape medium",
                     "bench/dynmole_vs_mixlora.py --shape medium --repeats 3 --init-router-scale 0"]
    calls, machine = run_gpu_script(tmp_path / "late", "medium", "profile", deadline=10, status=1)
    assert calls == [] and "gpu_medium.jsonl: skipped" in machine and "profile_medium.log: skipped" in machine


def test_the_packed_attention_part_times_larger_chunks_too(tmp_path):
    calls, _ = run_gpu_script(tmp_path, "packed_attention")
    assert calls == ["bench/packed_attention.py --shape medium --repeats 5 --chunk-tokens 128 512 2048"]


def test_a_failing_part_leaves_the_others_and_ends_the_call_with_its_line_last(tmp_path):
    calls, machine = run_gpu_script(tmp_path, "profile", "medium", status=1, failing="bench/profile_step.py")
    assert [call.split()[0] for call in calls] == ["bench/profile_step.py", "bench/gpu_medium.py"]
    assert "profile_medium.log: exit 3 in " in machine and "gpu_medium.jsonl: exit 0 in " in machine
