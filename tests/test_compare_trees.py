"""benchmarks/compare_trees.py on the CPU (the DALI graph on the CPU, ONNX Runtime CPU): the checkout compared
with itself, as a check that it runs each configuration in both trees and compares their rows."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")


def test_the_same_tree_twice_gives_the_same_rows_and_every_input_once(tmp_path):
    from benchmarks.compare_trees import main
    from benchmarks.throughput import REPO_ROOT

    assert main(["--old", REPO_ROOT, "--configs", "threads1,threads4:new", "--images", "12", "--repeat", "2",
                 "--providers", "cpu", "--decode", "dali_cpu", "--batch_size", "8", "--dali_threads", "1",
                 "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compare_trees.json").read_text())
    assert sorted(result["results"]) == ["new_threads1", "new_threads4", "old_threads1"]
    for name, entry in result["results"].items():
        assert entry["returncode"] == 0, name
        assert entry["accounting"]["every_input_once"] and entry["accounting"]["rows"] == 24, name
        assert entry["top1_vs_new_threads1"]["rows_with_another_top1"] == 0, name
        assert entry["edges"]["clock"] == "process" and 0 < entry["edges"]["first_image_s"] < entry["process_seconds"]
