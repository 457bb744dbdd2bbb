"""The two-GPU benchmark's checks, on the CPU: its accounting of a real multi-process job
(every listed image back exactly once), its steady-state rate read from the job's real progress
lines, and its two-vs-one ratios. The GPU runs themselves need the two-GPU machine."""

import io
import json
import os
import time

from benchmarks.multi_gpu import (GpuSampler, accounting, configurations, steady_rate, two_vs_one,
                                  write_id_manifest)
from pipelines import classify_images
from pipelines.partitions import committed_files
from pipelines.stats import ProgressPrinter
from transforms.timing import Progress


def test_a_multi_process_job_returns_every_listed_image_once(corpus, tmp_path):
    directory, good, broken = corpus
    paths = sorted(os.path.join(directory, name) for name in os.listdir(directory)
                   if not name.endswith((".txt", ".csv")))
    manifest = str(tmp_path / "ids.csv")
    listed = write_id_manifest(manifest, paths, repeat=2)  # each file twice, under two ids
    out = tmp_path / "out"
    stats = classify_images.run(["--input", manifest, "--output", str(out), "--batch_size", "4",
                                 "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    result = accounting(str(out), listed)
    assert result == {"listed": listed, "rows": listed, "distinct_ids": listed, "scored_twice": 0, "missing": 0,
                      "every_input_once": True}
    assert stats["images_per_device"] == {"cpu": stats["predictions"]} and stats["predictions"] == 2 * len(good)

    # A row written twice (and so one id short elsewhere) is caught.
    shard = committed_files(str(out), "predictions")[0]
    with open(shard) as f:
        rows = f.read().splitlines()
    rows[1] = json.dumps(json.loads(rows[0]))
    with open(shard, "w") as f:
        f.write("\n".join(rows) + "\n")
    result = accounting(str(out), listed)
    assert result["scored_twice"] == 1 and result["missing"] == 1 and not result["every_input_once"]


def test_steady_rate_reads_the_jobs_progress_lines(tmp_path):
    progress = Progress(str(tmp_path), every_s=0)
    stream = io.StringIO()
    with ProgressPrinter(str(tmp_path), every_s=0.05, stream=stream):
        for _ in range(20):
            progress.add("predictions", 100)
            time.sleep(0.03)
        time.sleep(0.1)
    rate = steady_rate(stream.getvalue())
    assert rate is not None and 200 < rate["images_per_second"] < 10000  # 100 images per ~0.03 s
    text = "\n".join(f"progress: {n} images scored, 0 dead letters, 1.0 images/s now, 1.0 images/s overall "
                     f"after {t:.1f} s" for n, t in ((0, 1), (0, 10), (100, 11), (500, 12), (900, 13), (1000, 14)))
    # Start-up (10 s with nothing scored) and the tail are out: 100 -> 900 images in 2 s.
    assert steady_rate(text) == {"images_per_second": 400.0, "from_images": 100, "to_images": 900, "seconds": 2.0}
    assert steady_rate("no progress lines") is None


def test_one_gpu_and_two_are_compared_at_the_same_process_count():
    assert configurations([1, 4, 8], ["0", "1"]) == [(1, 1), (1, 4), (2, 4), (1, 8), (2, 8)]
    assert configurations([4], ["0"]) == [(1, 4)]  # one GPU visible: nothing to compare
    runs = {"gpus1_procs4": {"gpus": 1, "processes": 4, "steady": {"images_per_second": 100.0},
                             "run_images_per_second": 80.0},
            "gpus2_procs4": {"gpus": 2, "processes": 4, "steady": {"images_per_second": 190.0},
                             "run_images_per_second": 120.0},
            "gpus1_procs1": {"gpus": 1, "processes": 1, "steady": {"images_per_second": 120.0}}}
    assert two_vs_one(runs) == {"procs4_steady": 1.9, "procs4_run": 1.5, "best_two_vs_best_one_steady": 1.583}


def test_the_gpu_sampler_summarises_only_while_the_job_was_on_the_gpus():
    sampler = GpuSampler()
    sampler.samples = [(0.5, 0, 0.0, 10.0), (0.5, 1, 0.0, 10.0), (1.0, 0, 80.0, 900.0), (1.0, 1, 60.0, 900.0),
                       (1.5, 0, 100.0, 900.0), (1.5, 1, 40.0, 900.0), (2.0, 0, 0.0, 900.0), (2.0, 1, 0.0, 900.0)]
    summary = sampler.summary()
    assert summary["window_seconds"] == 0.5
    assert summary["gpus"]["gpu0"]["mean_utilisation"] == 90.0 and summary["gpus"]["gpu1"]["mean_utilisation"] == 50.0
    assert summary["gpus"]["gpu0"]["utilisation_per_second"] == [0, 90, 0]
    assert summary["gpus"]["gpu1"]["max_memory_mib"] == 900.0
