"""benchmarks/compare_trees.py on the CPU (the DALI graph on the CPU, ONNX Runtime CPU): the checkout compared
with itself, as a check that it runs each configuration in both trees and compares their rows."""

from __future__ import annotations

import json
import os
import statistics

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
        assert entry["top1_vs_reference"]["rows_with_another_top1"] == 0, name
        assert entry["edges"]["clock"] == "process" and 0 < entry["edges"]["first_image_s"] < entry["process_seconds"]
    assert result["reference_run"] == "new_threads1" and result["rounds"] == 1
    # Every job started as in the worker image: what it lacks was hidden from them.
    from benchmarks.gpu import NOT_IN_WORKER_IMAGE

    assert sorted(os.listdir(tmp_path / "hidden_packages")) == sorted(NOT_IN_WORKER_IMAGE)


def test_a_flag_sweep_without_an_old_tree_runs_each_variant_every_round_and_takes_medians(tmp_path):
    """No --old: the configurations run on this checkout only, the whole sequence once per round; a variant's flags
    reach its job (its stats.json shows them), and each configuration's steady rates per round and their median are
    in the summary."""
    from benchmarks.compare_trees import main

    assert main(["--configs", "threads1,pf5", "--variant", "pf5=--prefetch 5", "--rounds", "2", "--images", "12",
                 "--repeat", "2", "--providers", "cpu", "--decode", "dali_cpu", "--batch_size", "8",
                 "--dali_threads", "1", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compare_trees.json").read_text())
    assert list(result["results"]) == ["new_threads1@1", "new_pf5@1", "new_threads1@2", "new_pf5@2"]
    assert result["old"] is None and result["reference_run"] == "new_threads1@1"
    assert result["configurations"]["pf5"] == ["--prefetch", "5"]
    for name, entry in result["results"].items():
        assert entry["returncode"] == 0 and entry["accounting"]["every_input_once"], name
        assert entry["top1_vs_reference"]["rows_with_another_top1"] == 0, name
        (stats,) = (tmp_path / name).glob("**/stats.json")
        assert json.loads(stats.read_text())["settings"]["prefetch_batches"] == (5 if "pf5" in name else 8), name
    for key in ("new_threads1", "new_pf5"):
        rates = result["summary"][key]["steady_per_round"]
        assert len(rates) == 2 and result["summary"][key]["rounds"] == 2
        known = [r for r in rates if r is not None]
        assert result["summary"][key]["steady_median"] == (round(statistics.median(known), 1) if known else None)


@pytest.mark.parametrize("variant", ["pf16", "=--prefetch 16", "threads1=--prefetch 16", "a,b=--prefetch 2",
                                     "q=--keep_columns 'a"])
def test_a_badly_written_variant_is_refused_before_anything_runs(variant, tmp_path, capsys):
    from benchmarks.compare_trees import main

    with pytest.raises(SystemExit) as e:
        main(["--configs", "threads1", "--variant", variant, "--output", str(tmp_path)])
    assert e.value.code == 2 and "--variant" in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists()


def test_an_unknown_configuration_is_refused_naming_the_fix(tmp_path):
    from benchmarks.compare_trees import main

    with pytest.raises(SystemExit, match="add it with --variant NAME=FLAGS"):
        main(["--configs", "threads1,pf16", "--output", str(tmp_path)])
    assert not (tmp_path / "corpus").exists()


def test_the_summary_takes_each_configurations_median_over_rounds_and_skips_runs_without_a_steady_window():
    from benchmarks.compare_trees import summary

    def run(steady, whole):
        return {"steady": None if steady is None else {"images_per_second": steady},
                "whole_process_images_per_second": whole}

    results = {"new_threads1@1": run(6000.0, 3000.0), "old_threads1@1": run(5000.0, 2900.0),
               "new_threads1@2": run(7000.0, 3400.0), "old_threads1@2": run(None, 2500.0),
               "new_threads1@3": run(6500.0, 3100.0), "old_threads1@3": run(5600.0, 2700.0)}
    medians = summary(results, 3)
    assert medians["new_threads1"]["steady_per_round"] == [6000.0, 7000.0, 6500.0]
    assert medians["new_threads1"]["steady_median"] == 6500.0
    assert medians["new_threads1"]["whole_process_median"] == 3100.0
    assert medians["old_threads1"]["steady_per_round"] == [5000.0, None, 5600.0]
    assert medians["old_threads1"]["steady_median"] == 5300.0
    assert medians["old_threads1"]["whole_process_median"] == 2700.0
    assert summary({"new_x": run(None, 10.0)}, 1)["new_x"]["steady_median"] is None
