"""The stats chart (``stats.png``, drawn from a ``stats.json`` document) and live progress for local runs.

The document itself is built in ``pipelines/run_record.py``.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Any, Deque, Dict, Tuple

from PIL import Image, ImageDraw, ImageFont

from transforms.timing import PUBLISH_EVERY_S, STAGES, Progress


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


#: A read of one image running this long is named in progress lines (a healthy one takes < 1 s).
SLOW_READ_S = 10.0


def slow_reads_note(older_than_s: float, most: int = 3) -> str:
    """``"; slow reads: a.jpg (42 s), ..."`` for this process's reads running longer, else "".

    Reads run in the launcher's process on local in-process runs (the DirectRunner's default
    here); a multi_processing worker's reads are not seen, though their timeouts still apply.
    """
    from images.reading import IN_FLIGHT

    slow = IN_FLIGHT.older_than(older_than_s)
    if not slow:
        return ""
    named = ", ".join(f"{uri} ({age:.0f} s)" for uri, age in slow[:most])
    return f"; {len(slow)} slow read(s): {named}" + (", ..." if len(slow) > most else "")


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
        self._reset(time.monotonic())

    def _loop(self):
        while not self._stop.wait(self._every_s):
            self._print()

    def _reset(self, start: float) -> None:
        self._start = start
        self._samples: Deque[Tuple[float, int]] = collections.deque([(start, 0)])

    def _rate_now(self, done: int, now: float) -> float:
        """Images/s over the last line interval, or over two of the workers' publications when that is longer:
        each worker rewrites its count at most every :data:`transforms.timing.PUBLISH_EVERY_S`, so a shorter
        window would read 0 on the lines that fall between two rewrites. Only the printing thread calls it."""
        window = max(self._every_s, 2 * PUBLISH_EVERY_S)
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= window:
            self._samples.popleft()
        then, done_then = self._samples[0]
        return (done - done_then) / max(now - then, 1e-9)

    def _print(self):
        counts = Progress.read(self._directory)
        done = counts.get("predictions", 0)
        now = time.monotonic()
        rate = self._rate_now(done, now)
        print(f"progress: {done} images scored, {counts.get('dead_letters', 0)} dead letters, "
              f"{rate:.1f} images/s now, {done / (now - self._start):.1f} images/s overall "
              f"after {now - self._start:.1f} s"
              f"{slow_reads_note(self._slow_read_s)}", file=self._stream, flush=True)

    def __enter__(self):
        self._reset(self._start)  # the clock still counts from construction, as the lines always have
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc):
        self._stop.set()
        self._thread.join(timeout=1)
        if exc_type is None and not self._thread.is_alive():
            # The final count of a run that ended, also between two lines (read only by this thread now);
            # a failed run's last words are its error.
            self._print()
