"""CI runs what the README tells a user to run, and the GPU tests where there is a GPU.

``.ci/run`` is executed for real with ``make`` and ``nvidia-smi`` replaced by small scripts on its
PATH that record how they were called: a GPU (``nvidia-smi -L`` lists one), a machine whose driver
fails, and one without ``nvidia-smi``. The Makefile's two lanes are read with ``make -n``, and pytest
itself says which tests each lane selects.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

CI = REPO / ".ci" / "run"
BASH = shutil.which("bash")


def _stub(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


def _run_ci(tmp_path, nvidia_smi=None, make_fails_on=None):
    """Runs .ci/run with stub ``make`` (records its arguments) and, unless None, a stub ``nvidia-smi``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "make-calls"
    fail = f'[ "$*" = "{make_fails_on}" ] && exit 2' if make_fails_on else ""
    _stub(bin_dir, "make", f'echo "$*" >> "{calls}"\n{fail}\nexit 0')
    if nvidia_smi is not None:
        _stub(bin_dir, "nvidia-smi", nvidia_smi)
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    proc = subprocess.run([BASH, str(CI)], env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60)
    made = calls.read_text().split("\n")[:-1] if calls.exists() else []
    return proc, made


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Try it: two commands\s*```bash\n(.*?)```", readme, flags=re.S).group(1)
    (command,) = [line.split("#")[0].strip() for line in block.splitlines() if "the test suite" in line]
    assert command == "make test"
    lines = [line.strip() for line in CI.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert command in lines and "set -euo pipefail" in lines


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_ci_adds_the_gpu_lane_where_nvidia_smi_lists_a_gpu(tmp_path):
    proc, made = _run_ci(tmp_path, nvidia_smi='[ "$1" = "-L" ] && echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"')
    assert proc.returncode == 0, proc.stderr
    assert made == ["test", "test-gpu"]
    assert "ci: GPU lane: GPU 0: NVIDIA H100" in proc.stdout


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("nvidia_smi", [None, 'echo "NVIDIA-SMI has failed because it could not communicate with '
                                              'the NVIDIA driver" >&2; exit 9'], ids=["no nvidia-smi", "no driver"])
def test_ci_skips_the_gpu_lane_without_a_gpu_and_says_so(tmp_path, nvidia_smi):
    proc, made = _run_ci(tmp_path, nvidia_smi=nvidia_smi)
    assert proc.returncode == 0, proc.stderr
    assert made == ["test"]
    assert "ci: no NVIDIA GPU here (nvidia-smi -L failed or is missing): skipping make test-gpu" in proc.stdout


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_ci_fails_when_the_tests_fail_and_starts_no_gpu_lane(tmp_path):
    proc, made = _run_ci(tmp_path, nvidia_smi='echo "GPU 0: NVIDIA H100"', make_fails_on="test")
    assert proc.returncode == 2
    assert made == ["test"]


def _pytest_line(target: str) -> str:
    """The pytest command ``make TARGET`` would run (``make -n`` prints it, running nothing)."""
    if shutil.which("make") is None:
        pytest.skip("needs make")
    out = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    (line,) = [line for line in out.splitlines() if " -m pytest " in line]
    return line


def _selected(marker_expression: str):
    """The node ids pytest collects with ``-m marker_expression``."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", marker_expression, "tests/gpu", "tests/test_ci.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 5), proc.stdout[-2000:] + proc.stderr[-2000:]  # 5: nothing selected
    return {line for line in proc.stdout.splitlines() if "::" in line}


def test_the_two_lanes_split_the_tests_by_the_gpu_and_cuda_markers():
    test_line, gpu_line = _pytest_line("test"), _pytest_line("test-gpu")
    default = re.search(r'-m "([^"]+)"', test_line).group(1)
    gpu = re.search(r'-m "([^"]+)"', gpu_line).group(1)
    assert (default, gpu) == ("not (gpu or cuda)", "gpu or cuda")
    # Every test under tests/gpu is in the GPU lane and none is left to the default lane, which on
    # a CPU machine would only skip it; the CPU tests stay in the default lane.
    in_gpu, in_default = _selected(gpu), _selected(default)
    gpu_tests = {node for node in in_gpu | in_default if node.startswith("tests/gpu/")}
    assert gpu_tests and in_gpu == gpu_tests
    assert in_default and not in_default & gpu_tests
