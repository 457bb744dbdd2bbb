"""Stage timing as Beam metrics, a latency histogram, and live progress for local runs.

Every stage records its wall time per element (or per batch) in microseconds as a
Beam ``Distribution`` under the namespace :data:`NAMESPACE`; ``pipelines.stats``
reads them back after the run. Beam's Python metrics have no percentiles, so batch
latencies also go into a log-bucketed histogram of counters (buckets 2**(1/8) apart,
about 9% wide); percentiles are read from it with that resolution.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Dict, Optional

from apache_beam.metrics import Metrics

NAMESPACE = "beam_trt"
STAGES = ("read", "decode", "inference", "postprocess", "write")
HISTOGRAM_PREFIX = "batch_latency_bucket_"
#: Counters of images scored per device: "scored_on_gpu0", "scored_on_cpu" (stats.json's images_per_device).
DEVICE_PREFIX = "scored_on_"
_BUCKETS_PER_OCTAVE = 8


def device_counter(device: Optional[int]) -> str:
    """The counter of images scored on ``device`` (a GPU index, or None for the CPU)."""
    return f"{DEVICE_PREFIX}cpu" if device is None else f"{DEVICE_PREFIX}gpu{int(device)}"


def stage_distribution(stage: str):
    """The Distribution (microseconds) a stage records into."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    return Metrics.distribution(NAMESPACE, f"{stage}_us")


def latency_bucket(seconds: float) -> int:
    """Index of the histogram bucket for a latency; bucket i covers (2**((i-1)/8), 2**(i/8)] us."""
    micros = max(seconds * 1e6, 1.0)
    return int(math.ceil(math.log2(micros) * _BUCKETS_PER_OCTAVE))


def bucket_upper_seconds(index: int) -> float:
    return 2.0 ** (index / _BUCKETS_PER_OCTAVE) / 1e6


class LatencyHistogram:
    """Counts batch latencies in log buckets, as Beam counters ``batch_latency_bucket_<i>``."""

    def __init__(self, namespace: str = NAMESPACE):
        self._namespace = namespace
        self._counters: Dict[int, object] = {}

    def record(self, seconds: float) -> None:
        index = latency_bucket(seconds)
        counter = self._counters.get(index)
        if counter is None:
            counter = self._counters[index] = Metrics.counter(self._namespace, f"{HISTOGRAM_PREFIX}{index}")
        counter.inc()


def percentile_from_buckets(buckets: Dict[int, int], q: float) -> Optional[float]:
    """The q-th percentile (0-100) in seconds: the upper edge of the bucket holding it."""
    total = sum(buckets.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q / 100.0 * total))
    seen = 0
    for index in sorted(buckets):
        seen += buckets[index]
        if seen >= rank:
            return bucket_upper_seconds(index)
    return bucket_upper_seconds(max(buckets))


#: How often a worker process rewrites its progress count at most (:class:`Progress`), in seconds.
PUBLISH_EVERY_S = 1.0


class Progress:
    """Counts finished images per process and publishes the count to a small file.

    The launcher of a local run sums these files every few seconds to print
    progress (see ``pipelines.stats.ProgressPrinter``). With no directory (on
    Dataflow, whose UI shows the counters) it does nothing.

    Args:
        directory: A local directory shared with the launcher, or None.
        every_s: How often a process rewrites its file. Default :data:`PUBLISH_EVERY_S`.
    """

    _lock = threading.Lock()
    _counts: Dict[str, Dict[str, int]] = {}  # directory -> kind -> count (one run per directory)
    _last_write: Dict[str, float] = {}

    def __init__(self, directory: Optional[str], every_s: float = PUBLISH_EVERY_S):
        self.directory = directory
        self.every_s = every_s

    def add(self, kind: str, n: int = 1, force: bool = False) -> None:
        if not self.directory:
            return
        with Progress._lock:
            counts = Progress._counts.setdefault(self.directory, {})
            counts[kind] = counts.get(kind, 0) + n
            now = time.monotonic()
            if not force and now - Progress._last_write.get(self.directory, 0.0) < self.every_s:
                return
            Progress._last_write[self.directory] = now
            counts = dict(counts)
        path = os.path.join(self.directory, f"progress-{os.getpid()}.txt")
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
            os.replace(tmp, path)
        except OSError:
            pass  # progress is best-effort; the results do not depend on it

    def flush(self, kind: str) -> None:
        """Publishes the current counts now (end of a bundle), so the last lines are not stale."""
        self.add(kind, 0, force=True)

    @staticmethod
    def read(directory: str) -> Dict[str, int]:
        """Sums the counts every process published in ``directory``."""
        totals: Dict[str, int] = {}
        try:
            names = os.listdir(directory)
        except OSError:
            return totals
        for name in names:
            if not (name.startswith("progress-") and name.endswith(".txt")):
                continue
            try:
                with open(os.path.join(directory, name)) as f:
                    for item in f.read().split():
                        key, _, value = item.partition("=")
                        totals[key] = totals.get(key, 0) + int(value)
            except (OSError, ValueError):
                continue
        return totals
