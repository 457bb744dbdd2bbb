"""benchmarks/gil_window.py: py-spy's raw stacks read into per-thread shares of the window, the collections inside
the window, and a real job profiled in its steady state (the stand-in engine, DALI's CPU graph, real py-spy)."""

import json
import os
import shutil

import pytest

from benchmarks import gil_window

RAW = """\
thread (0x7f01): MainThread;<module> (pipelines/classify_images.py:35);run (pipelines/classify_images.py:90);\
process (transforms/scored.py:190);lstat_all (transforms/scored.py:120) 6
thread (0x7f01): MainThread;<module> (pipelines/classify_images.py:35);run (pipelines/classify_images.py:90);\
process (transforms/postprocess.py:200);walk (transforms/postprocess.py:10);walk (transforms/postprocess.py:12) 3
thread (123): read-local_0;_bootstrap (threading.py:1);read (images/reading.py:300) 1
"""


def test_raw_stacks_become_each_threads_share_of_the_window_and_its_frames():
    profile = gil_window.parse_raw(RAW + "a line without a count\n\n")
    assert profile["samples"] == 10
    assert dict(profile["threads"]) == {"MainThread": 9, "read-local_0": 1}
    # A frame counts once per stack, however deep it recurses; line numbers are dropped.
    assert profile["inclusive"]["MainThread"]["walk (transforms/postprocess.py)"] == 3
    assert profile["leaf"]["MainThread"]["lstat_all (transforms/scored.py)"] == 6

    summary = gil_window.summarize(profile, ticks=40, top=10)
    assert summary["held"] == 0.25 and summary["samples"] == 10
    main = summary["threads"]["MainThread"]
    assert main["share"] == 0.225 and main["samples"] == 9
    # The job's entry frames are on every stack of the launching thread: the project list starts below them
    # (most samples first, equal counts by name).
    assert main["project"] == [["lstat_all (transforms/scored.py)", 6], ["process (transforms/scored.py)", 6],
                               ["process (transforms/postprocess.py)", 3], ["walk (transforms/postprocess.py)", 3]]
    assert summary["threads"]["read-local_0"]["project"] == [["read (images/reading.py)", 1]]


def test_only_the_collections_that_ended_inside_the_window_count():
    log = [[9.0, 2, 0.5], [10.5, 0, 0.001], [11.0, 1, 0.01], [12.0, 2, 0.2], [20.0, 0, 0.3]]
    found = gil_window.collections_in(log, 10.0, 12.0)
    assert found["gen0"] == {"collections": 1, "seconds": 0.001, "longest_s": 0.001}
    assert found["gen1"]["collections"] == 1 and found["gen2"] == {"collections": 1, "seconds": 0.2, "longest_s": 0.2}
    assert found["seconds"] == pytest.approx(0.211)


def test_the_job_must_be_given_its_flags():
    with pytest.raises(SystemExit):
        gil_window.parse_args(["--output", "x"])
    args = gil_window.parse_args(["--output", "x", "--", "--input", "in.txt"])
    assert args.job[:2] == ["--input", "in.txt"] and "--progress_every_s" in args.job and "--output" in args.job


def test_a_running_job_is_profiled_in_its_steady_state(corpus, tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(os.sys.executable), "py-spy")
    if not os.path.exists(spy):
        pytest.fail("py-spy is missing: `make test` installs the benchmark extra, which has it")
    _, good, _ = corpus
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("".join(f"{path}\n" for path in good * 50))  # 600 inputs
    # The stand-in engine sleeps 4 ms an image without the GIL, as a GPU's call waits: ~2.4 s of scoring to attach to.
    monkeypatch.setenv("NOOP_ENGINE_US_PER_IMAGE", "4000")
    out = tmp_path / "gw"
    assert gil_window.main(["--output", str(out), "--module", "benchmarks.noop_job", "--after_images", "16",
                            "--seconds", "1", "--py_spy", spy, "--",
                            "--input", str(inputs), "--decode", "dali_cpu", "--batch_size", "16"]) == 0
    report = json.loads((out / "gil_window.json").read_text())
    window = report["gil_window"]
    assert window["ticks"] == 100 and 0 < window["samples"] <= 100 and window["held"] == window["samples"] / 100
    assert sum(t["samples"] for t in window["threads"].values()) == window["samples"]
    assert report["returncode"] == 0 and report["attached_at_images"] >= 16
    assert set(report["gc_in_gil_window"]) == {"gen0", "gen1", "gen2", "seconds"}
    result = json.loads((out / "result.json").read_text())
    assert result["stats"]["predictions"] == 600 and result["stats"]["dead_letters"] == 0
