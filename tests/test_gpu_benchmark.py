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
