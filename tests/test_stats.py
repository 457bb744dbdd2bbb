"""Timing stats pieces: the latency histogram, stats.json assembly and live progress."""

from __future__ import annotations

import io
import time

import pytest

from pipelines.run_record import build_stats
from pipelines.stats import ProgressPrinter, render_chart
from transforms.timing import Progress, bucket_upper_seconds, latency_bucket, percentile_from_buckets


def test_latency_buckets_are_within_9_percent():
    for seconds in (0.0013, 0.02, 0.5, 3.0):
        upper = bucket_upper_seconds(latency_bucket(seconds))
        assert seconds <= upper < seconds * 1.091


def test_percentiles_from_buckets():
    buckets = {latency_bucket(0.010): 90, latency_bucket(0.100): 9, latency_bucket(1.0): 1}
    assert percentile_from_buckets(buckets, 50) == pytest.approx(0.010, rel=0.091)
    assert percentile_from_buckets(buckets, 95) == pytest.approx(0.100, rel=0.091)
    assert percentile_from_buckets(buckets, 99) == pytest.approx(0.100, rel=0.091)
    assert percentile_from_buckets(buckets, 100) == pytest.approx(1.0, rel=0.091)
    assert percentile_from_buckets({}, 50) is None


def test_build_stats_shares_and_percentiles_never_exceed_the_max():
    metrics = {
        "counters": {"predictions": 90, "dead_letters": 10, "batches": 4, "bytes_read": 123, "inputs": 101},
        "distributions": {"read_us": {"sum": 1_000_000}, "decode_us": {"sum": 3_000_000},
                          "inference_us": {"sum": 5_000_000, "count": 4, "min": 1_000_000, "max": 1_400_000},
                          "postprocess_us": {"sum": 500_000}, "write_us": {"sum": 500_000},
                          "batch_size": {"sum": 90, "count": 4}},
        "buckets": {latency_bucket(1.2): 3, latency_bucket(1.4): 1},
    }
    stats = build_stats(metrics, 10.0, None, {"engine": "onnxruntime"}, {})
    assert stats["inputs"] == 101 and stats["unaccounted"] == 1  # one input lost would show here
    assert stats["images"] == 100 and stats["images_per_second"] == 9.0
    assert stats["stage_share"] == {"read": 0.1, "decode": 0.3, "inference": 0.5, "postprocess": 0.05, "write": 0.05}
    lat = stats["batch_latency_seconds"]
    assert lat["p99"] <= lat["max"] == 1.4 and lat["mean"] == 1.25
    assert render_chart(stats).size == (900, 520)


def test_progress_is_summed_across_processes_and_printed(tmp_path):
    Progress(str(tmp_path), every_s=0).add("predictions", 3)
    (tmp_path / "progress-99999.txt").write_text("predictions=4 dead_letters=2")  # another worker process
    assert Progress.read(str(tmp_path)) == {"predictions": 7, "dead_letters": 2}
    stream = io.StringIO()
    with ProgressPrinter(str(tmp_path), every_s=0.05, stream=stream):
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2
    assert lines[0].startswith("progress: 7 images scored, 2 dead letters, ") and "images/s" in lines[0]


def test_progress_prints_the_final_count_when_the_run_ends_between_lines(tmp_path):
    # A run shorter than one interval: the last line still shows every image, so a reader of the log (the
    # benchmarks' first-image and after-last-image seconds) sees the run finish.
    stream = io.StringIO()
    with ProgressPrinter(str(tmp_path), every_s=3600, stream=stream):
        Progress(str(tmp_path), every_s=0).add("predictions", 24)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("progress: 24 images scored, 0 dead letters, ")
    # A failed run's last words are its error, not a count.
    stream = io.StringIO()
    with pytest.raises(RuntimeError):
        with ProgressPrinter(str(tmp_path), every_s=3600, stream=stream):
            raise RuntimeError("the job failed")
    assert stream.getvalue() == ""


def test_progress_flush_publishes_counts_held_back_by_the_interval(tmp_path):
    progress = Progress(str(tmp_path / "run"), every_s=3600)
    (tmp_path / "run").mkdir()
    progress.add("predictions", 1, force=True)
    progress.add("predictions", 5)  # within the interval: counted, not yet published
    assert Progress.read(str(tmp_path / "run")) == {"predictions": 1}
    progress.flush("predictions")
    assert Progress.read(str(tmp_path / "run")) == {"predictions": 6}


def test_the_rate_now_spans_two_publications_so_lines_between_them_do_not_read_zero(tmp_path):
    # Workers rewrite their counts at most once a second (transforms.timing.PUBLISH_EVERY_S); with lines every
    # 0.5 s, a rate over one interval read 0.0 images/s on every other line of a steady 12,000 images/s run.
    from transforms.timing import PUBLISH_EVERY_S

    printer = ProgressPrinter(str(tmp_path), every_s=0.5, stream=io.StringIO())
    printer._reset(0.0)  # not started: the rate is driven below with a made-up clock
    rates = []
    for tick in range(1, 13):  # 6 s of lines; the published count steps by 12,000 each second
        now = tick * 0.5
        rates.append(printer._rate_now(12_000 * int(now // PUBLISH_EVERY_S), now))
    assert PUBLISH_EVERY_S == 1.0
    assert all(rate > 0 for rate in rates[1:]), rates
    assert all(abs(rate - 12_000) <= 3_000 for rate in rates[4:]), rates
    # At the default of one line every 5 s, the rate is over the last interval, as before.
    printer = ProgressPrinter(str(tmp_path), stream=io.StringIO())
    printer._reset(0.0)
    assert [printer._rate_now(done, t) for done, t in ((500, 5.0), (1500, 10.0), (1500, 15.0))] == [100, 200, 0]
