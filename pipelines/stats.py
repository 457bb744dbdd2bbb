"""Run statistics: Beam metrics -> ``stats.json`` + a PNG chart, and live progress for local runs."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Dict, Optional

from PIL import Image, ImageDraw, ImageFont

from transforms.timing import (DEVICE_PREFIX, HISTOGRAM_PREFIX, NAMESPACE, STAGES, Progress,
                               percentile_from_buckets)


def merge_distributions(results, keep=lambda name: True) -> Dict[str, Dict[str, Any]]:
    """Beam distribution results merged by metric name (steps and workers report apart).

    Args:
        results: ``DistributionResult``s, as ``result.metrics().query()["distributions"]`` lists them.
        keep: Which metric names to merge. Default: all.

    Returns:
        ``{name: {"sum", "count", "min", "max"}}``; empty distributions are left out.
    """
    merged: Dict[str, Dict[str, Any]] = {}
    for dist in results:
        name, value = dist.key.metric.name, dist.committed
        if value is None or not value.count or not keep(name):
            continue
        entry = merged.setdefault(name, {"sum": 0, "count": 0, "min": None, "max": None})
        entry["sum"] += value.sum
        entry["count"] += value.count
        entry["min"] = value.min if entry["min"] is None else min(entry["min"], value.min)
        entry["max"] = value.max if entry["max"] is None else max(entry["max"], value.max)
    return merged


def collect_metrics(result) -> Dict[str, Any]:
    """Reads this project's counters and distributions from a finished pipeline result.

    Returns:
        ``{"counters": {name: int}, "distributions": {name: {sum, count, min, max}}, "buckets": {i: n}}``.
    """
    from apache_beam.metrics.metric import MetricsFilter

    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counters, buckets = {}, {}
    for counter in query["counters"]:
        name, value = counter.key.metric.name, counter.committed or 0
        if name.startswith(HISTOGRAM_PREFIX):
            index = int(name[len(HISTOGRAM_PREFIX):])
            buckets[index] = buckets.get(index, 0) + value
        else:
            counters[name] = counters.get(name, 0) + value
    return {"counters": counters, "distributions": merge_distributions(query["distributions"]), "buckets": buckets}


def build_stats(metrics: Dict[str, Any], wall_seconds: float, inputs: Optional[int], engine: Dict[str, Any],
                settings: Dict[str, Any]) -> Dict[str, Any]:
    """Builds the ``stats.json`` document.

    Args:
        metrics: From :func:`collect_metrics`.
        wall_seconds: Wall time of the whole run (launch to finish).
        inputs: Number of inputs when known; otherwise the pipeline's ``inputs`` counter (every
            matched file and manifest entry), or predictions + dead letters when that is absent.
        engine: Engine and model description.
        settings: The run's settings (batch size, runner, ...).
    """
    counters, dists = metrics["counters"], metrics["distributions"]
    predictions = counters.get("predictions", 0)
    dead = counters.get("dead_letters", 0)
    skipped = counters.get("skipped", 0)  # --skip_scored: already scored by a committed run
    if inputs is None:
        inputs = counters.get("inputs", predictions + dead + skipped)
    stage_seconds = {s: dists.get(f"{s}_us", {}).get("sum", 0) / 1e6 for s in STAGES}
    total_stage = sum(stage_seconds.values()) or 1.0
    batches = dists.get("batch_size", {})
    inference = dists.get("inference_us", {})
    observed_max = inference["max"] / 1e6 if inference.get("max") is not None else None
    pct = {}
    for q in (50, 95, 99):
        value = percentile_from_buckets(metrics["buckets"], q)
        # A bucket's upper edge can exceed the largest latency seen; never report more than that.
        pct[f"p{q}"] = min(value, observed_max) if value is not None and observed_max is not None else value
    return {
        "images": predictions + dead,
        "predictions": predictions,
        "dead_letters": dead,
        "skipped": skipped,
        "inputs": inputs,
        "unaccounted": inputs - predictions - dead - skipped,
        "unlistable_directories": counters.get("unlistable_directories", 0),
        "wall_seconds": round(wall_seconds, 3),
        "images_per_second": round(predictions / wall_seconds, 2) if wall_seconds > 0 else None,
        "bytes_read": counters.get("bytes_read", 0),
        # Images each device's engine copies scored ("gpu0", "gpu1", "cpu"): with several GPUs,
        # whether work reached every one of them (transforms.timing.device_counter).
        "images_per_device": {name[len(DEVICE_PREFIX):]: n for name, n in sorted(counters.items())
                              if name.startswith(DEVICE_PREFIX)},
        "batches": counters.get("batches", 0),
        "mean_batch_size": round(batches["sum"] / batches["count"], 2) if batches.get("count") else None,
        "batch_latency_seconds": {
            **{k: None if v is None else round(v, 6) for k, v in pct.items()},
            "mean": round(inference["sum"] / inference["count"] / 1e6, 6) if inference.get("count") else None,
            "max": round(inference["max"] / 1e6, 6) if inference.get("max") is not None else None,
            "note": "percentiles are upper edges of log buckets 9% wide",
        },
        "stage_seconds": {s: round(v, 6) for s, v in stage_seconds.items()},
        "stage_share": {s: round(v / total_stage, 4) for s, v in stage_seconds.items()},
        "stage_note": ("summed wall time spent in each stage across all workers and threads; stages overlap, "
                       "so the sum exceeds wall_seconds when work runs in parallel"),
        "engine": engine,
        "settings": settings,
    }


def chart_font(size: int):
    """Pillow's default font at ``size`` (unsized on Pillow < 10.1); used by every chart we draw."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def render_chart(stats: Dict[str, Any]) -> Image.Image:
    """A PNG-ready chart: share of time per stage and batch latency percentiles."""
    width, height = 900, 520
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title, small = chart_font(22), chart_font(15)
    engine = stats.get("engine", {})
    draw.text((20, 14), f"{stats['predictions']} predictions, {stats['dead_letters']} dead letters, "
                        f"{stats['images_per_second'] or 0:.1f} images/s", fill="black", font=title)
    draw.text((20, 46), f"engine: {engine.get('engine', '?')}  model: {str(engine.get('model', '?'))[-60:]}  "
                        f"wall: {stats['wall_seconds']:.1f} s", fill="#444", font=small)
    colors = {"read": "#4e79a7", "decode": "#f28e2b", "inference": "#e15759", "postprocess": "#76b7b2",
              "write": "#59a14f"}
    draw.text((20, 84), "Share of summed stage time", fill="black", font=small)
    left, bar_w = 150, 600
    for row, stage in enumerate(STAGES):
        y = 110 + row * 34
        share = stats["stage_share"].get(stage, 0.0)
        draw.text((20, y + 4), stage, fill="black", font=small)
        draw.rectangle((left, y, left + bar_w, y + 24), outline="#ccc")
        draw.rectangle((left, y, left + max(1, int(bar_w * share)), y + 24), fill=colors[stage])
        draw.text((left + bar_w + 10, y + 4), f"{share * 100:.1f}%  ({stats['stage_seconds'][stage]:.2f} s)",
                  fill="black", font=small)
    draw.text((20, 300), "Batch latency (ms)", fill="black", font=small)
    lat = stats["batch_latency_seconds"]
    values = [(k, lat.get(k)) for k in ("p50", "p95", "p99", "max")]
    top = max([v for _, v in values if v] or [1e-3])
    for row, (name, value) in enumerate(values):
        y = 326 + row * 34
        draw.text((20, y + 4), name, fill="black", font=small)
        draw.rectangle((left, y, left + bar_w, y + 24), outline="#ccc")
        if value:
            draw.rectangle((left, y, left + max(1, int(bar_w * value / top)), y + 24), fill="#9c755f")
            draw.text((left + bar_w + 10, y + 4), f"{value * 1e3:.1f}", fill="black", font=small)
    draw.text((20, height - 28), f"mean batch size {stats['mean_batch_size']}, {stats['batches']} batches; "
                                 f"percentiles from 9%-wide log buckets", fill="#444", font=small)
    return image


def write_stats(directory: str, stats: Dict[str, Any]) -> Dict[str, str]:
    """Writes ``stats.json`` and ``stats.png`` into ``directory`` (any Beam filesystem)."""
    import io

    from engines import storage

    paths = {"json": storage.join(directory, "stats.json"), "png": storage.join(directory, "stats.png")}
    storage.write_bytes(paths["json"], (json.dumps(stats, indent=2) + "\n").encode("utf-8"))
    buf = io.BytesIO()
    render_chart(stats).save(buf, format="PNG")
    storage.write_bytes(paths["png"], buf.getvalue())
    return paths


#: A read of one image running this long is named in progress lines (a healthy one takes < 1 s).
SLOW_READ_S = 10.0


def slow_reads_note(older_than_s: float, most: int = 3) -> str:
    """``"; slow reads: a.jpg (42 s), ..."`` for this process's reads running longer, else "".

    Reads run in the launcher's process on local in-process runs (the DirectRunner's default
    here); a multi_processing worker's reads are not seen, though their timeouts still apply.
    """
    from transforms.reading import IN_FLIGHT

    slow = IN_FLIGHT.older_than(older_than_s)
    if not slow:
        return ""
    named = ", ".join(f"{uri} ({age:.0f} s)" for uri, age in slow[:most])
    return f"; {len(slow)} slow read(s): {named}" + (", ..." if len(slow) > most else "")


def committed_stats(summary: Dict[str, Any], engine: Dict[str, Any], settings: Dict[str, Any],
                    metrics: Optional[Dict[str, Any]] = None, wall_seconds: Optional[float] = None) -> Dict[str, Any]:
    """The ``stats.json`` of a committed run: its counts from ``_SUCCESS``, its timing from metrics.

    Args:
        summary: The commit step's ``_SUCCESS`` document (counts, run id, start and end time).
        engine: Engine and model description.
        settings: The run's settings.
        metrics: From :func:`collect_metrics` when the launcher waited for the job; None inside
            the job (the commit step cannot read the job's metrics, so per-stage timing is absent).
        wall_seconds: Launch to finish, when the launcher measured it; else start to commit.
    """
    import datetime as dt

    metrics = {"counters": {}, "distributions": {}, "buckets": {}, **(metrics or {})}
    # The committed rows are the truth; metrics of retried bundles could only disagree by a bug.
    metrics["counters"] = {**metrics["counters"], **{k: summary[k] for k in ("predictions", "dead_letters",
                                                                                  "skipped")}}
    if wall_seconds is None:
        start, end = (dt.datetime.fromisoformat(summary[k]) for k in ("start_time", "end_time"))
        wall_seconds = (end - start).total_seconds()
    stats = build_stats(metrics, wall_seconds, summary["inputs"], engine, settings)
    stats["run"] = {k: summary.get(k) for k in ("run_id", "run_date", "start_time", "end_time", "skip_scored")}
    if summary.get("bigquery"):
        stats["bigquery"] = summary["bigquery"]  # the table, partition, rows and load jobs (transforms/bigquery.py)
    stats["timing"] = "from Beam metrics (the launcher waited)" if metrics["distributions"] else (
        "counts only: per-stage timing is in the runner's metrics (the commit step cannot read them)")
    return stats


class CommittedStatsWriter:
    """``write_stats(output, summary)`` for the commit step: a small picklable recipe."""

    def __init__(self, engine: Dict[str, Any], settings: Dict[str, Any]):
        self._engine, self._settings = engine, settings

    def __call__(self, run_folder: str, summary: Dict[str, Any]) -> None:
        from engines import storage
        from pipelines.classify_images import common_failure  # at call time: it imports this module

        stats = committed_stats(summary, self._engine, self._settings)
        dead = [storage.join(run_folder, name.split("/", 1)[-1]) for name in summary["files"].get("dead_letter", [])]
        stats["setup_problem"] = common_failure(dead, stats)  # template runs have no launcher to say it
        write_stats(run_folder, stats)


class ProgressPrinter:
    """Prints images done and images/s every ``every_s`` seconds while a local run goes on.

    Args:
        directory: The directory the workers' :class:`transforms.timing.Progress` write to.
        every_s: Seconds between lines. Default 5.
        stream: Where to print. Default stderr.
        slow_read_s: Reads running longer are named on the line. Default :data:`SLOW_READ_S`.
    """

    def __init__(self, directory: str, every_s: float = 5.0, stream=None, slow_read_s: float = SLOW_READ_S):
        self._slow_read_s = slow_read_s
        self._directory = directory
        self._every_s = every_s
        self._stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._start = time.monotonic()

    def _loop(self):
        last_done, last_t = 0, self._start
        while not self._stop.wait(self._every_s):
            counts = Progress.read(self._directory)
            done = counts.get("predictions", 0)
            now = time.monotonic()
            rate = (done - last_done) / max(now - last_t, 1e-9)
            print(f"progress: {done} images scored, {counts.get('dead_letters', 0)} dead letters, "
                  f"{rate:.1f} images/s now, {done / (now - self._start):.1f} images/s overall "
                  f"after {now - self._start:.1f} s"
                  f"{slow_reads_note(self._slow_read_s)}", file=self._stream, flush=True)
            last_done, last_t = done, now

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=1)
