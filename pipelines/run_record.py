"""What a run leaves behind to be read: its ``stats.json`` (and ``stats.png``), built once.

The document is built in the job, by the commit step (:class:`CommittedStatsWriter`): the
committed counts from ``_SUCCESS``, the engine and settings, and the setup problem behind a run in
which every input failed the same way (:func:`common_failure`). A launcher that waited for the job
then adds what only Beam's metrics know (per-stage timing, latency, bytes read, images per device,
its own wall time) to that document (:func:`add_launcher_timing`): it reads what the job wrote and
annotates it, it does not build it again. A Flex Template launch has no waiting launcher: its
``stats.json`` is the job's.
"""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any, Dict, Optional, Sequence

from engines import storage
from engines.base import EngineError
from pipelines.stats import render_chart
from transforms.timing import (DEVICE_PREFIX, HISTOGRAM_PREFIX, NAMESPACE, STAGES, percentile_from_buckets)

_LOG = logging.getLogger(__name__)

#: ``timing`` in stats.json: where its per-stage figures come from.
TIMING_FROM_METRICS = "from Beam metrics (the launcher waited)"
TIMING_COUNTS_ONLY = "counts only: per-stage timing is in the runner's metrics (the commit step cannot read them)"


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


def _counts(counters: Dict[str, int], inputs: Optional[int]) -> Dict[str, Any]:
    """The run's counts: every input ends as a prediction, a dead letter or a skip."""
    predictions = counters.get("predictions", 0)
    dead = counters.get("dead_letters", 0)
    skipped = counters.get("skipped", 0)  # --skip_scored: already scored by a committed run
    if inputs is None:
        inputs = counters.get("inputs", predictions + dead + skipped)
    return {
        "images": predictions + dead,
        "predictions": predictions,
        "dead_letters": dead,
        "skipped": skipped,
        "inputs": inputs,
        "unaccounted": inputs - predictions - dead - skipped,
    }


def metric_fields(metrics: Dict[str, Any], wall_seconds: float, predictions: int) -> Dict[str, Any]:
    """Everything stats.json takes from Beam's metrics and the wall time (not the counts).

    Args:
        metrics: From :func:`collect_metrics` (empty inside the job).
        wall_seconds: Wall time of the whole run.
        predictions: The run's predictions, for images per second.
    """
    counters, dists = metrics["counters"], metrics["distributions"]
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
        "unlistable_directories": counters.get("unlistable_directories", 0),
        "wall_seconds": round(wall_seconds, 3),
        "images_per_second": round(predictions / wall_seconds, 2) if wall_seconds > 0 else None,
        "bytes_read": counters.get("bytes_read", 0),
        # Images each device's engine copies scored ("gpu0", "gpu1", "cpu"): with several GPUs,
        # whether work reached every one of them (transforms.timing.device_counter).
        "images_per_device": {name[len(DEVICE_PREFIX):]: n for name, n in sorted(counters.items())
                              if name.startswith(DEVICE_PREFIX)},
        "batches": counters.get("batches", 0),
        # Batches whose scoring the reader started as soon as they were read (transforms.ahead), and how
        # many of those RunInference took; the rest were scored when RunInference reached them. Started
        # and not taken (a batch that left the process, a failed bundle) is work done twice.
        "batches_started_ahead": counters.get("batches_started_ahead", 0),
        "batches_scored_ahead": counters.get("batches_scored_ahead", 0),
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
    }


def build_stats(metrics: Dict[str, Any], wall_seconds: float, inputs: Optional[int], engine: Dict[str, Any],
                settings: Dict[str, Any]) -> Dict[str, Any]:
    """Builds the ``stats.json`` document.

    Args:
        metrics: From :func:`collect_metrics`.
        wall_seconds: Wall time of the whole run (launch to finish).
        inputs: Number of inputs when known; otherwise the pipeline's ``inputs`` counter (every
            matched file and manifest entry), or predictions + dead letters when that is absent.
        engine: Engine and model description.
        settings: The run's settings (``pipelines.settings.RunSettings.record``).
    """
    counts = _counts(metrics["counters"], inputs)
    return {**counts, **metric_fields(metrics, wall_seconds, counts["predictions"]), "engine": engine,
            "settings": settings}


def committed_stats(summary: Dict[str, Any], engine: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, Any]:
    """The ``stats.json`` of a committed run as the job knows it: its counts and times from ``_SUCCESS``.

    Args:
        summary: The commit step's ``_SUCCESS`` document (counts, run id, start and end time).
        engine: Engine and model description.
        settings: The run's settings.
    """
    import datetime as dt

    # The committed rows are the truth; metrics of retried bundles could only disagree by a bug.
    counters = {k: summary[k] for k in ("predictions", "dead_letters", "skipped")}
    start, end = (dt.datetime.fromisoformat(summary[k]) for k in ("start_time", "end_time"))
    stats = build_stats({"counters": counters, "distributions": {}, "buckets": {}},
                        (end - start).total_seconds(), summary["inputs"], engine, settings)
    stats["run"] = {k: summary.get(k) for k in ("run_id", "run_date", "start_time", "end_time", "skip_scored")}
    if summary.get("bigquery"):
        stats["bigquery"] = summary["bigquery"]  # the table, partition, rows and load jobs (transforms/bigquery.py)
    stats["timing"] = TIMING_COUNTS_ONLY
    return stats


def common_failure(dead_letter_files: Sequence[str], stats: Dict[str, Any]) -> Optional[str]:
    """The setup problem behind a run in which every input failed the same way, or None.

    Read from the written dead-letter rows after the run: when nothing was predicted and every
    row failed at the same stage for the same reason (file names and numbers aside), the cause
    is the setup, not the images.

    Returns:
        "<count> of <inputs> inputs failed at <stage>: <one reason>; <flag to change>", or None.
    """
    from apache_beam.io.filesystems import FileSystems

    if stats["predictions"] or not stats["dead_letters"] or stats["unaccounted"]:
        return None
    kinds, example = set(), None
    for path in dead_letter_files:
        with FileSystems.open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                reason = row["error"].replace(row["uri"], "<file>")
                kinds.add((row["stage"], re.sub(r"[0-9]+", "N", re.sub(r"'[^']*'|\"[^\"]*\"", "''", reason))))
                example = example or row
                if len(kinds) > 1:
                    return None
    if example is None:
        return None
    stage, reason = example["stage"], example["error"]
    if stage == "inference":
        flag = ("lower --batch_size" if re.search(r"alloc|memory", reason, re.I)
                else "check --model (or --engine_path) and --batch_size")
    elif "pixel limit" in reason:
        flag = "raise --max_pixels if the files are trusted"
    else:
        flag = "check --input"
    return (f"all {stats['dead_letters']} inputs failed at {stage} for the same reason, a setup problem rather "
            f"than bad images: {reason} ({flag})")


def job_stats(run_folder: str, summary: Dict[str, Any], engine: Dict[str, Any],
              settings: Dict[str, Any]) -> Dict[str, Any]:
    """The document the job writes: :func:`committed_stats` and the setup problem, if any.

    Args:
        run_folder: The run's folder, where its dead-letter files are.
        summary: The commit step's ``_SUCCESS`` document.
        engine: Engine and model description.
        settings: The run's settings.
    """
    stats = committed_stats(summary, engine, settings)
    dead = [storage.join(run_folder, name.split("/", 1)[-1]) for name in summary["files"].get("dead_letter", [])]
    stats["setup_problem"] = common_failure(dead, stats)  # template runs have no launcher to say it
    return stats


def write_stats(directory: str, stats: Dict[str, Any]) -> Dict[str, str]:
    """Writes ``stats.json`` and ``stats.png`` into ``directory`` (any Beam filesystem)."""
    paths = {"json": storage.join(directory, "stats.json"), "png": storage.join(directory, "stats.png")}
    storage.write_bytes(paths["json"], (json.dumps(stats, indent=2) + "\n").encode("utf-8"))
    buf = io.BytesIO()
    render_chart(stats).save(buf, format="PNG")
    storage.write_bytes(paths["png"], buf.getvalue())
    return paths


class CommittedStatsWriter:
    """``write_stats(run_folder, summary)`` for the commit step: a small picklable recipe that writes
    :func:`job_stats` (the one place the document is built)."""

    def __init__(self, engine: Dict[str, Any], settings: Dict[str, Any]):
        self._engine, self._settings = engine, settings

    def __call__(self, run_folder: str, summary: Dict[str, Any]) -> None:
        write_stats(run_folder, job_stats(run_folder, summary, self._engine, self._settings))


def add_metrics(document: Dict[str, Any], metrics: Dict[str, Any], wall_seconds: float) -> Dict[str, Any]:
    """``document`` (the job's stats.json) with what Beam's metrics and the launcher's clock know.

    The counts, the run and the setup problem stay the job's; the metric fields
    (:func:`metric_fields`) and ``timing`` are replaced.

    Returns:
        A new dict.
    """
    metrics = {"counters": {}, "distributions": {}, "buckets": {}, **metrics}
    return {**document, **metric_fields(metrics, wall_seconds, document["predictions"]),
            "timing": TIMING_FROM_METRICS if metrics["distributions"] else TIMING_COUNTS_ONLY}


def add_launcher_timing(run_folder: str, summary: Dict[str, Any], engine: Dict[str, Any], settings: Dict[str, Any],
                        metrics: Dict[str, Any], wall_seconds: float) -> Dict[str, Any]:
    """Reads the stats.json the job wrote, adds the launcher's timing (:func:`add_metrics`) and the
    file's own path, and writes it back.

    A job's stats.json that cannot be read (removed by hand) is made again by :func:`job_stats`.
    A failed write only warns: the partition is committed with the job's stats.json.

    Args:
        run_folder: The committed run's folder.
        summary: Its ``_SUCCESS`` document.
        engine: Engine and model description.
        settings: The run's settings.
        metrics: From :func:`collect_metrics`.
        wall_seconds: Launch to finish, as the launcher measured it.

    Returns:
        The document as written (what ``pipelines.classify_images.run`` returns).
    """
    path = storage.join(run_folder, "stats.json")
    try:
        document = json.loads(storage.read_bytes(path, "The job's stats.json"))
    except (EngineError, ValueError) as e:
        _LOG.warning("cannot read the job's stats.json (%s); making it again from the _SUCCESS record", e)
        document = job_stats(run_folder, summary, engine, settings)
    stats = add_metrics(document, metrics, wall_seconds)
    stats["stats_file"] = path
    try:
        write_stats(run_folder, stats)
    except EngineError as e:  # a full disk, say: the partition is committed with the commit step's stats
        _LOG.warning("the run is committed, but adding the timing to its stats.json failed (%s); the committed "
                     "stats.json has the counts", e)
    return stats


def replaced_run_stats(metrics: Dict[str, Any], wall_seconds: float, engine: Dict[str, Any],
                       settings: Dict[str, Any], run_id: str, replaced_by: str) -> Dict[str, Any]:
    """The stats of a run that committed and was already replaced by a run launched after it: its
    files (stats.json among them) are gone, so its counts come from its metrics. Nothing is written."""
    stats = build_stats(metrics, wall_seconds, None, engine, settings)
    stats.update(run={"run_id": run_id, "replaced_by": replaced_by}, stats_file=None, setup_problem=None)
    return stats
