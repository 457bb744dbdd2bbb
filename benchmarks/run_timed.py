"""Runs one pipeline's ``run(argv)`` in this (fresh) interpreter and times the call, not the imports.

    python -m benchmarks.run_timed RESULT.json MODULE [pipeline arguments ...]

``benchmarks.throughput`` starts one of these per measured pipeline, so every run
gets a clean runner state. The libraries both pipelines need (Beam, ONNX, ONNX
Runtime, numpy, Pillow) and MODULE itself are imported before the clock starts;
the clock then covers pipeline construction, start, every stage and finish.
RESULT.json gets ``{"module", "import_seconds", "wall_seconds", "stats"}``, where
``stats`` is what ``run`` returned when that is a dict (``pipelines.classify_images``
returns its stats.json document), else null.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time

#: Imported before timing so neither pipeline pays for them inside its measured wall time.
PREIMPORT = ("numpy", "PIL.Image", "onnx", "onnxruntime", "apache_beam",
             "apache_beam.ml.inference.base", "apache_beam.io.fileio")


def runinference_metrics(result) -> dict:
    """RunInference's own batch-size and latency distributions from a PipelineResult ({} for anything else)."""
    if not hasattr(result, "metrics"):
        return {}
    try:
        query = result.metrics().query()
    except Exception as e:  # a runner without metrics support: the timing still counts
        return {"error": f"{type(e).__name__}: {e}"}
    from pipelines.run_record import merge_distributions

    return merge_distributions(query["distributions"], keep=lambda name: name.startswith("inference_"))


def _process_age() -> float:
    """Seconds since this process started (the interpreter's own start-up included), from /proc; 0 elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class _Stamped:
    """stderr with each line prefixed ``[+T s]``, T the seconds since this process's start: the progress lines
    then say when the first image was scored and the last, in the process's own clock
    (``benchmarks.multi_gpu.edges``)."""

    def __init__(self, stream, origin: float):
        self._stream, self._origin, self._at_line_start = stream, origin, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_line_start:
                out.append(f"[+{time.monotonic() - self._origin:.2f} s] ")
            out.append(piece)
            self._at_line_start = piece.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: python -m benchmarks.run_timed RESULT.json MODULE [pipeline arguments ...]", file=sys.stderr)
        return 2
    result_path, module_name, pipeline_argv = argv[0], argv[1], argv[2:]
    sys.stderr = _Stamped(sys.stderr, time.monotonic() - _process_age())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The runner's choice (Prism tried first, then FnApiRunner) is logged at INFO; keep it for the report.
    logging.getLogger("apache_beam.runners.direct.direct_runner").setLevel(logging.INFO)
    # The project's own lines (model and decoder loads, the warm-up, the memory check) with their times.
    for name in ("engines", "images", "transforms"):
        logging.getLogger(name).setLevel(logging.INFO)
    start = time.monotonic()
    for name in PREIMPORT:
        importlib.import_module(name)
    module = importlib.import_module(module_name)
    imported = time.monotonic()
    returned = module.run(pipeline_argv)
    finished = time.monotonic()
    document = {
        "module": module_name,
        "argv": pipeline_argv,
        "import_seconds": round(imported - start, 3),
        "wall_seconds": round(finished - imported, 3),
        "stats": returned if isinstance(returned, dict) else None,
        "runinference_metrics": runinference_metrics(returned),
        "pid": os.getpid(),
    }
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(document, f, indent=2, default=str)
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
