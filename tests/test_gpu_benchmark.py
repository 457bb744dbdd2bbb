"""The GPU benchmark's label check (benchmarks/gpu.py), on a real job's output on the CPU."""

import json
import os

import pytest

from benchmarks.concurrency import differing_rows, selected
from benchmarks.gpu import check_labels
from benchmarks.multi_gpu import write_id_manifest
from pipelines import classify_images
from pipelines.partitions import committed_files


def test_rows_with_another_images_label_are_counted(corpus, tmp_path):
    directory, good, _ = corpus
    paths = sorted(good)
    manifest = str(tmp_path / "ids.csv")
    write_id_manifest(manifest, paths, repeat=2)
    once, twice = tmp_path / "once", tmp_path / "twice"
    classify_images.run(["--input", manifest, "--output", str(twice), "--batch_size", "4"])
    single = tmp_path / "single.txt"
    single.write_text("\n".join(paths) + "\n")
    classify_images.run(["--input", str(single), "--output", str(once), "--batch_size", "1"])

    assert check_labels(str(twice), str(once))["rows_with_another_top1"] == 0
    assert check_labels(str(twice), None) == {"against": "the run's own majority per image", "rows": 2 * len(good),
                                              "rows_with_another_top1": 0, "near_ties": 0, "share": 0.0,
                                              "images_without_reference": 0, "examples": []}

    # One row given another image's prediction: counted against the reference and within the run.
    shard = committed_files(str(twice), "predictions")[0]
    rows = [json.loads(line) for line in open(shard)]
    other = next(r for r in rows if r["top_k"][0]["class_id"] != rows[0]["top_k"][0]["class_id"])
    rows[0]["top_k"] = other["top_k"]
    with open(shard, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert check_labels(str(twice), str(once))["rows_with_another_top1"] == 1
    assert check_labels(str(twice), None)["rows_with_another_top1"] == 1
    # The row is shown beside the reference's, top classes and scores, to tell a near tie from a swap.
    [shown] = differing_rows(str(once), str(twice))
    assert shown["uri"] == rows[0]["uri"] and shown["row"][0][0] == other["top_k"][0]["class_id"]
    assert shown["reference"][0][0] != shown["row"][0][0]
    assert differing_rows(str(once), str(once)) == []

    # A tie (the first two classes a hair apart, ranked the other way) is no other image's label.
    rows = [json.loads(line) for line in open(shard)]
    tied = rows[2]
    first, second = tied["top_k"][0], tied["top_k"][1]
    tied["top_k"][0], tied["top_k"][1] = dict(second, score=first["score"]), dict(first, score=first["score"] - 1e-4)
    with open(shard, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    result = check_labels(str(twice), str(once))
    assert (result["rows_with_another_top1"], result["near_ties"]) == (1, 1), result


def test_the_concurrency_configurations_named_run_after_the_reference():
    assert [name for name, _ in selected("threads8")] == ["threads1", "threads8"]
    assert len(selected("")) == 8
    with pytest.raises(SystemExit, match="threads9"):
        selected("threads9")


def test_each_pipeline_run_is_shown_against_the_engine_alone_with_its_edges_gpu_and_labels():
    from benchmarks.gpu import ratios_of, runs_table
    from benchmarks.multi_gpu import GpuSampler

    sampler = GpuSampler()
    sampler.samples = [(0.5, 0, 0.0, 500.0), (1.0, 0, 80.0, 9000.0), (1.5, 0, 100.0, 9500.0), (2.0, 0, 0.0, 600.0)]
    ours = {"steady": {"images_per_second": 8000.0}, "whole_process_images_per_second": 5000.0,
            "run_images_per_second": 6000.0, "edges": {"first_image_s": 5.5, "after_last_image_s": 1.2},
            "gpu_samples": sampler.summary(),
            "labels": {"rows": 200, "rows_with_another_top1": 0, "near_ties": 1}}
    results = {"engine_device": {"images_per_second": 10000.0}, "engine_device_fp16": {"images_per_second": 20000.0},
               "ours_gpu": ours, "ours_cpu": {"whole_process_images_per_second": 900.0}}
    assert ratios_of(results, "fp32")["ours_gpu_steady_vs_engine_device"] == 0.8
    assert ratios_of(results, "fp32")["ours_gpu_whole_process_images_per_second_vs_engine_device"] == 0.5
    assert ratios_of(results, "fp16")["ours_gpu_steady_vs_engine_device"] == 0.4  # against the fp16 ceiling
    lines = runs_table({"results": results}, "fp32").splitlines()
    assert lines[2] == ("| ours --decode gpu | 8,000 (0.80) | 5,000 (0.50) | 5.5 / 1.2 | 90 / 9,500 | "
                        "0 of 200 (1 near ties) |")
    assert lines[3] == "| ours --decode cpu | - | 900 (0.09) | - / - | - | - |"  # what it did not give is -
    assert len(lines) == 4  # no no-op run here
    without_engine = runs_table({"results": {"ours_gpu": ours}}).splitlines()[2]
    assert without_engine.startswith("| ours --decode gpu | 8,000 | 5,000 |")


def test_the_gpu_jobs_start_without_what_the_worker_image_lacks_by_default(tmp_path):
    import subprocess
    import sys

    from benchmarks.gpu import NOT_IN_WORKER_IMAGE, hidden_packages, parse_args

    assert set(NOT_IN_WORKER_IMAGE) == {"torch", "pandas"}
    assert parse_args([]).hide.split(",") == list(NOT_IN_WORKER_IMAGE)
    folder = hidden_packages(str(tmp_path), NOT_IN_WORKER_IMAGE)
    for name in NOT_IN_WORKER_IMAGE:
        run = subprocess.run([sys.executable, "-c", f"import {name}"], env=dict(os.environ, PYTHONPATH=folder),
                             capture_output=True, text=True)
        assert run.returncode != 0 and f"{name} is hidden by benchmarks.gpu --hide" in run.stderr
