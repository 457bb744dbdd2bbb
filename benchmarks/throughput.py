"""Throughput benchmark: the engine alone, this project's pipeline, and the docs-style peer, on one machine.

    python -m benchmarks.throughput --images 2000 [--engine onnxruntime] [--batch_size 32] \\
        [--output benchmark_output] [--modes default,multi_threading,multi_processing] \\
        [--runner_args "--direct_running_mode=multi_processing --direct_num_workers=2"]

In one run, on the same corpus (JPEGs cut from scikit-image's photos, see
:mod:`benchmarks.corpus`) and the same EfficientNet-Lite0 weights, it measures:

1. **engine-only**: the engine alone on ready uint8 batches in memory (the corpus
   preprocessed beforehand exactly as the pipeline does), at ``--batch_size``,
   after warm-up. The ceiling: the engine gets the machine's default thread count
   (``--intra_op_threads`` in ``--runner_args`` is not applied to it).
2. **ours**: ``pipelines.classify_images`` end to end (JPEG files -> prediction
   files) with ``--runner_args`` passed through.
3. **peer**: :mod:`benchmarks.peer_pipeline` (the pipeline Beam's docs and
   examples lead to) in each ``--modes`` local runner mode; the best is the peer.

Every pipeline runs in its own interpreter (``benchmarks.run_timed``) with a
timeout and a freshly cleaned output directory; its images/s is images scored over
the wall time of its ``run()`` call (pipeline construction to finish; interpreter
and library imports excluded). Ours also reports the images/s its stats.json
measured. Each run's output rows are counted and a run that did not score every
image is flagged. Results go to stdout (a table), ``OUTPUT/throughput.json`` and
``OUTPUT/throughput.png``.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from benchmarks import report
from benchmarks.corpus import Corpus, CorpusError, _cores, ensure_corpus, preprocess_corpus
from pipelines.partitions import committed_rows

_LOG = logging.getLogger("benchmarks.throughput")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PEER_MODEL = os.path.join(REPO_ROOT, "models", "efficientnet_lite0_float32_nchw.onnx")
MODES = ("default", "multi_threading", "multi_processing")
#: Targets the notes compare against (benchmarks/NOTES.md): (ours / engine-only, ours / peer) by core count.
TARGETS = {2: {"ours/engine-only": 0.8, "ours/peer": 1.3}, 16: {"ours/engine-only": 0.8, "ours/peer": 5.0}}


class BenchmarkError(Exception):
    """A broken benchmark setup (missing model, bad arguments); the message says the fix."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                        help="cpu: this benchmark; gpu: benchmarks.gpu (engine, decoder and pipeline on a GPU).")
    parser.add_argument("--images", type=int, default=2000, help="Corpus size. Default: 2000.")
    parser.add_argument("--engine", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                        help="Engine for engine-only and ours. Default: onnxruntime.")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="Batch size of engine-only and ours (--batch_size of the pipeline). Default: 32.")
    parser.add_argument("--output", default="benchmark_output", help="Output directory. Default: benchmark_output.")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"Peer runner modes, comma-separated, from {', '.join(MODES)}; empty skips the "
                             f"peer. Default: all three.")
    parser.add_argument("--workers", type=int, default=0,
                        help="--direct_num_workers of the peer's multi_* modes; 0 = one per core. Default: 0.")
    parser.add_argument("--runner_args", default="",
                        help="Extra arguments for ours (pipelines.classify_images), one shell-quoted string, "
                             "e.g. \"--direct_running_mode=multi_processing --direct_num_workers=2\".")
    parser.add_argument("--model", default=None,
                        help="Our uint8 NHWC ONNX model. Default: the pipeline's default model.")
    parser.add_argument("--peer_model", default=DEFAULT_PEER_MODEL,
                        help="The peer's float32 NCHW export of the same weights. Default: "
                             "models/efficientnet_lite0_float32_nchw.onnx.")
    parser.add_argument("--corpus_dir", default=None,
                        help="Corpus cache directory. Default: OUTPUT/corpus.")
    parser.add_argument("--seed", type=int, default=0, help="Corpus seed. Default: 0.")
    parser.add_argument("--warmup_batches", type=int, default=5,
                        help="Engine-only batches run before timing. Default: 5.")
    parser.add_argument("--engine_min_seconds", type=float, default=5.0,
                        help="Engine-only repeats whole passes over the corpus until this long. Default: 5.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Measure everything this many times (pipelines interleaved); each figure is the best "
                             "of them. Default: 1.")
    parser.add_argument("--timeout_s", type=float, default=3600.0,
                        help="Limit per pipeline run, seconds. Default: 3600.")
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.repeats < 1:
        raise BenchmarkError(f"--images, --batch_size and --repeats must be >= 1, got {args.images}, "
                             f"{args.batch_size} and {args.repeats}")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.mode_list if m not in MODES]
    if unknown:
        raise BenchmarkError(f"--modes: unknown mode(s) {unknown}; choose from {list(MODES)}")
    args.workers = args.workers or _cores()
    args.corpus_dir = args.corpus_dir or os.path.join(args.output, "corpus")
    try:
        args.runner_argv = shlex.split(args.runner_args)
    except ValueError as e:
        raise BenchmarkError(f"--runner_args is not a valid shell-quoted string ({e}): {args.runner_args!r}")
    return args


# ------------------------------------------------------------------------------------------ machine load


class CpuMonitor:
    """Measures, over a block, this benchmark's CPU time and everybody else's on the machine.

    Other processes on the machine (or a noisy host: steal time) make throughput figures
    unreliable; the result says how much of the machine they took, so such runs can be
    flagged instead of trusted. Linux only (``/proc/stat``); elsewhere the figures are None.
    """

    def __init__(self, cores: int):
        self._cores = cores
        self.result: Dict[str, Any] = {}

    @staticmethod
    def _machine():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...
        busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
        steal = fields[7] if len(fields) > 7 else 0
        return busy, steal

    @staticmethod
    def _own() -> float:
        import resource

        self_usage = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return self_usage.ru_utime + self_usage.ru_stime + children.ru_utime + children.ru_stime

    def __enter__(self):
        self._start = (time.monotonic(), self._machine(), self._own())
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self._start[0]
        machine, own = self._machine(), self._own() - self._start[2]
        self.result = {"own_cpu_seconds": round(own, 2), "own_cpu_cores": round(own / wall, 2) if wall else None}
        if machine and self._start[1] and wall > 0:
            tick = os.sysconf("SC_CLK_TCK")
            busy = (machine[0] - self._start[1][0]) / tick
            steal = (machine[1] - self._start[1][1]) / tick
            self.result.update(
                foreign_cpu_share=round(max(0.0, busy - own) / (wall * self._cores), 3),
                steal_share=round(steal / (wall * self._cores), 3))
        return False


# ---------------------------------------------------------------------------------------------- engine-only


def engine_settings(args) -> Any:
    """The pipeline's own settings for this run, so engine-only loads the engine exactly as ours does."""
    from pipelines.settings import resolve

    argv = ["--input", "unused", "--output", "unused", "--engine", args.engine,
            "--batch_size", str(args.batch_size)] + (["--model", args.model] if args.model else []) + args.runner_argv
    # The last of a repeated flag wins: the ceiling is ONNX Runtime's defaults, one thread per core
    # and spinning, fastest for the engine alone.
    return resolve(argv + ["--intra_op_threads", "0", "--ort_spinning", "on"], start_checks=False)[0]


def measure_engine(args, corpus: Corpus) -> Dict[str, Any]:
    """Engine-only: ready uint8 batches in memory, warm-up excluded, whole passes until engine_min_seconds."""
    from pipelines.classify_images import make_handler

    start = time.monotonic()
    images = preprocess_corpus(corpus.paths)
    prep_seconds = time.monotonic() - start
    batches = [np.ascontiguousarray(images[i:i + args.batch_size]) for i in range(0, len(images), args.batch_size)]
    del images
    settings = engine_settings(args)
    handler, engine_info = make_handler(settings), settings.engine_record()
    engine = handler.load_model().engine  # the pipeline's model is engine + decoder; time the engine alone
    try:
        names = list(engine.input_specs)
        if len(names) != 1:
            raise BenchmarkError(f"engine-only feeds one uint8 input; the model has inputs {names}")
        name = names[0]
        output = "logits" if "logits" in engine.output_specs else list(engine.output_specs)[0]
        for i in range(args.warmup_batches):
            engine.infer({name: batches[i % len(batches)]})
        top1: List[int] = []
        latencies = []
        blocks = []
        for repeat in range(args.repeats):
            done, passes = 0, 0
            with CpuMonitor(_cores()) as monitor:
                timed_start = time.perf_counter()
                while True:
                    for batch in batches:
                        t = time.perf_counter()
                        result = engine.infer({name: batch})
                        latencies.append(time.perf_counter() - t)
                        if repeat == 0 and passes == 0:
                            top1.extend(int(c) for c in np.argmax(result[output], axis=-1))
                        done += len(batch)
                    passes += 1
                    elapsed = time.perf_counter() - timed_start
                    if elapsed >= args.engine_min_seconds:
                        break
            blocks.append({"images_per_second": round(done / elapsed, 2), "seconds": round(elapsed, 3),
                           "images_timed": done, "passes": passes, "cpu": monitor.result})
        describe = engine.describe()
    finally:
        engine.close()
        del engine
        gc.collect()
    best = max(blocks, key=lambda b: b["images_per_second"])
    return {
        "name": "engine-only", "kind": "engine-only", **best, "repeats": blocks, "batch_size": args.batch_size,
        "batches_per_pass": len(batches), "warmup_batches": args.warmup_batches,
        "batch_latency_ms": {"p50": round(float(np.percentile(latencies, 50)) * 1e3, 2),
                             "p95": round(float(np.percentile(latencies, 95)) * 1e3, 2)},
        "preprocess_seconds_untimed": round(prep_seconds, 2), "engine": {**engine_info, **describe},
        "intra_op_threads": 0, "scored": len(top1), "complete": len(top1) == len(corpus.paths),
        "_top1": dict(zip((os.path.basename(p) for p in corpus.paths), top1)),
    }


# ------------------------------------------------------------------------------------------ pipeline runs


def _kill_group(proc: subprocess.Popen) -> None:
    """Kills the run's own process group (its multi_processing workers included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_child(name: str, module: str, argv: List[str], workdir: str, timeout_s: float,
              env_extra: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Runs ``module.run(argv)`` in a fresh interpreter via benchmarks.run_timed.

    Args:
        env_extra: Environment variables to set for the run (e.g. ``CUDA_VISIBLE_DEVICES``).

    Returns:
        ``{"returncode", "process_seconds", "timed_out", "log", "timing": run_timed's JSON or None}``.
    """
    result_path = os.path.join(workdir, f"{name}.run.json")
    log_path = os.path.join(workdir, f"{name}.log")
    for path in (result_path, log_path):
        if os.path.exists(path):
            os.remove(path)
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(env_extra or {})
    command = [sys.executable, "-m", "benchmarks.run_timed", result_path, module] + argv
    start = time.monotonic()
    timed_out = False
    monitor = CpuMonitor(_cores())
    with monitor, open(log_path, "w") as log:
        log.write("$ " + "".join(f"{k}={shlex.quote(v)} " for k, v in (env_extra or {}).items())
                  + " ".join(shlex.quote(c) for c in command) + "\n")
        log.flush()
        # A session of its own, so a timeout can end the run together with its worker processes.
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            returncode = proc.wait()
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
    process_seconds = time.monotonic() - start
    timing = None
    if returncode == 0 and os.path.exists(result_path):
        with open(result_path) as f:
            timing = json.load(f)
    with open(log_path, errors="replace") as f:
        log_text = f.read()
    return {"returncode": returncode, "timed_out": timed_out, "process_seconds": round(process_seconds, 3),
            "log": log_path, "timing": timing, "log_text": log_text, "cpu": monitor.result}


def _runner_used(log_text: str) -> str:
    if "Running pipeline with PrismRunner" in log_text and "Falling back to DirectRunner" not in log_text:
        return "PrismRunner"
    return "FnApiRunner (DirectRunner)"


def _error_tail(log_text: str, lines: int = 6) -> str:
    tail = [line for line in log_text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(tail)





def _finish_run(entry: Dict[str, Any], child: Dict[str, Any], images: int, top1: Dict[str, int]) -> Dict[str, Any]:
    """Adds timing, row counts and flags to a pipeline run entry."""
    timing = child["timing"]
    scored = len(top1)
    entry.update(returncode=child["returncode"], timed_out=child["timed_out"],
                 process_seconds=child["process_seconds"], log=child["log"], scored=scored,
                 complete=scored == images and child["returncode"] == 0,
                 runner_used=_runner_used(child["log_text"]), cpu=child["cpu"])
    if timing:
        wall = timing["wall_seconds"]
        entry.update(seconds=wall, import_seconds=timing["import_seconds"],
                     images_per_second=round(scored / wall, 2) if wall > 0 else None)
        metrics = timing.get("runinference_metrics") or {}
        sizes = metrics.get("inference_request_batch_size")
        if sizes and sizes.get("count"):
            entry["mean_batch_size"] = round(sizes["sum"] / sizes["count"], 2)
            entry["batches"] = sizes["count"]
        latency = metrics.get("inference_batch_latency_micro_secs")
        if latency and latency.get("count") and wall > 0:
            entry["inference_seconds"] = round(latency["sum"] / 1e6, 3)
    else:
        entry.update(seconds=None, images_per_second=None,
                     error=("timed out" if child["timed_out"] else f"exit code {child['returncode']}") +
                           ": " + _error_tail(child["log_text"]))
    entry["_top1"] = top1
    return entry


def run_ours(args, corpus: Corpus, workdir: str) -> Dict[str, Any]:
    out = os.path.join(workdir, "ours")
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--input", corpus.glob, "--output", out, "--engine", args.engine, "--batch_size", str(args.batch_size)]
    if args.model:
        argv += ["--model", args.model]
    argv += args.runner_argv
    _LOG.info("ours: pipelines.classify_images %s", " ".join(shlex.quote(a) for a in argv))
    child = run_child("ours", "pipelines.classify_images", argv, workdir, args.timeout_s)
    rows = committed_rows(out, "predictions", missing_ok=True)
    dead = committed_rows(out, "dead_letter", missing_ok=True)
    top1 = {os.path.basename(r["uri"]): int(r["top_k"][0]["class_id"]) for r in rows if r.get("top_k")}
    entry = {"name": "ours", "kind": "ours", "args": argv, "output": out, "prediction_rows": len(rows),
             "dead_letter_rows": len(dead)}
    entry = _finish_run(entry, child, len(corpus.paths), top1)
    if len(rows) != len(top1):
        entry["complete"] = False
        entry["duplicate_rows"] = len(rows) - len(top1)
    stats = (child["timing"] or {}).get("stats")
    if stats:
        entry["stats"] = {k: stats.get(k) for k in ("images_per_second", "wall_seconds", "predictions",
                                                    "dead_letters", "mean_batch_size", "batches", "stage_seconds",
                                                    "stage_share", "batch_latency_seconds", "settings")}
        entry["pipeline_images_per_second"] = stats.get("images_per_second")
        entry["mean_batch_size"] = stats.get("mean_batch_size")
        entry["inference_seconds"] = (stats.get("stage_seconds") or {}).get("inference")
    if dead:
        entry["dead_letter_examples"] = dead[:3]
    return entry


def peer_mode_args(mode: str, workers: int) -> List[str]:
    if mode == "default":
        return []
    return [f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"]


def run_peer(args, corpus: Corpus, workdir: str, mode: str) -> Dict[str, Any]:
    name = f"peer-{mode}"
    out = os.path.join(workdir, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    argv = ["--input", corpus.glob, "--output", os.path.join(out, "predictions.txt"),
            "--model_path", args.peer_model] + peer_mode_args(mode, args.workers)
    _LOG.info("%s: benchmarks.peer_pipeline %s", name, " ".join(shlex.quote(a) for a in argv))
    child = run_child(name, "benchmarks.peer_pipeline", argv, workdir, args.timeout_s)
    lines = []
    for path in sorted(glob.glob(os.path.join(out, "predictions*.txt"))):
        with open(path, encoding="utf-8") as f:
            lines.extend(line.strip() for line in f if line.strip())
    top1 = {}
    for line in lines:
        path, _, class_id = line.rpartition(",")
        top1[os.path.basename(path)] = int(class_id)
    entry = {"name": name, "kind": "peer", "mode": mode, "args": argv, "output": out, "prediction_rows": len(lines),
             "workers": None if mode == "default" else args.workers}
    entry = _finish_run(entry, child, len(corpus.paths), top1)
    if len(lines) != len(top1):
        entry["complete"] = False
        entry["duplicate_rows"] = len(lines) - len(top1)
    if mode != "default" and entry["runner_used"] == "PrismRunner":
        entry["note"] = "ran on PrismRunner, which ignores --direct_running_mode"
    return entry


def best_of(entries: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The fastest complete run of one pipeline (else the last), with every repeat's figures attached."""
    complete = [e for e in entries if e.get("complete") and e.get("images_per_second")]
    best = dict(max(complete, key=lambda e: e["images_per_second"]) if complete else entries[-1])
    if len(entries) > 1:
        best["repeats"] = [{k: e.get(k) for k in ("images_per_second", "seconds", "scored", "complete", "cpu")}
                           for e in entries]
        incomplete = [e for e in entries if not e.get("complete")]
        if incomplete and best.get("complete"):
            best["note"] = f"{len(incomplete)} of {len(entries)} repeats did not score every image"
    return best


#: Share of the machine's CPU other processes may take during a measurement before it is flagged.
FOREIGN_CPU_LIMIT = 0.10

# ------------------------------------------------------------------------------------------------ summary


def agreement(a: Dict[str, int], b: Dict[str, int]) -> Optional[float]:
    common = set(a) & set(b)
    if not common:
        return None
    return round(sum(a[k] == b[k] for k in common) / len(common), 4)


def versions() -> Dict[str, str]:
    from importlib import metadata

    found = {"python": platform.python_version()}
    for package in ("apache-beam", "onnxruntime", "onnx", "numpy", "pillow", "scikit-image"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def targets_for(cores: int) -> Optional[Dict[str, Any]]:
    """The issue's targets for this core count (2-core and 16-core machines), or None."""
    if cores <= 2:
        return {"machine": "2 cores", **TARGETS[2]}
    if cores >= 16:
        return {"machine": "16 cores", **TARGETS[16]}
    return None


def summarize(args, corpus: Corpus, results: List[Dict[str, Any]], started: float) -> Dict[str, Any]:
    cores = _cores()
    by_kind = {r["kind"]: r for r in results if r["kind"] != "peer"}
    peers = [r for r in results if r["kind"] == "peer"]
    usable_peers = [r for r in peers if r.get("images_per_second") and r["complete"]]
    best_peer = max(usable_peers, key=lambda r: r["images_per_second"]) if usable_peers else None
    for r in peers:
        r["best"] = r is best_peer
    engine, ours = by_kind.get("engine-only"), by_kind.get("ours")
    ours_ips = ours.get("images_per_second") if ours and ours["complete"] else None
    ratios = {
        "ours/engine-only": round(ours_ips / engine["images_per_second"], 3)
        if ours_ips and engine and engine.get("images_per_second") else None,
        "ours/peer": round(ours_ips / best_peer["images_per_second"], 3) if ours_ips and best_peer else None,
    }
    flags = []
    for r in results:
        if not r.get("complete"):
            flags.append(f"{r['name']}: scored {r.get('scored', 0)} of {len(corpus.paths)} images"
                         + (f" ({r['error']})" if r.get("error") else ""))
        if r.get("note"):
            flags.append(f"{r['name']}: {r['note']}")
        foreign = (r.get("cpu") or {}).get("foreign_cpu_share") or 0.0
        steal = (r.get("cpu") or {}).get("steal_share") or 0.0
        if foreign > FOREIGN_CPU_LIMIT or steal > FOREIGN_CPU_LIMIT:
            flags.append(f"{r['name']}: other processes took {foreign:.0%} of the machine's CPU (steal "
                         f"{steal:.0%}) during the measurement; its figure is unreliable, rerun on a quiet machine")
    top1 = {r["name"]: r.pop("_top1") for r in results if "_top1" in r}
    checks = {}
    if "ours" in top1 and "engine-only" in top1:
        checks["top1_agreement_ours_vs_engine_only"] = agreement(top1["ours"], top1["engine-only"])
    if "ours" in top1 and best_peer is not None:
        checks["top1_agreement_ours_vs_peer"] = agreement(top1["ours"], top1[best_peer["name"]])
    target = targets_for(cores)
    if target:
        target = dict(target)
        target["met"] = {k: (ratios[k] >= target[k] if ratios[k] is not None else None)
                         for k in ("ours/engine-only", "ours/peer")}
    return {
        "settings": {
            "images": len(corpus.paths), "seed": corpus.seed, "engine": args.engine, "batch_size": args.batch_size,
            "runner_args": args.runner_args, "peer_modes": args.mode_list, "peer_workers": args.workers,
            "repeats": args.repeats,
            "peer_batching": "RunInference defaults (BatchElements: min 1, max 10000, adaptive)",
            "cores": cores, "cpu_count": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(),
            "versions": versions(), "model": args.model or "pipeline default (models/efficientnet_lite0.onnx)",
            "peer_model": args.peer_model,
            "corpus": {"dir": corpus.image_dir, "reused": corpus.reused, "sources": corpus.sources,
                       "megabytes": round(corpus.total_bytes / 1e6, 2)},
            "timing": "images scored / wall time of run() in a fresh interpreter, imports excluded",
        },
        "results": results,
        "peer_best": best_peer["name"] if best_peer else None,
        "ratios": ratios,
        "targets": target,
        "checks": checks,
        "flags": flags,
        "benchmark_seconds": round(time.monotonic() - started, 1),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--device" in argv and argv[argv.index("--device") + 1:argv.index("--device") + 2] == ["gpu"] \
            or "--device=gpu" in argv:
        from benchmarks import gpu

        return gpu.main([a for a in argv if a != "--device=gpu"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    started = time.monotonic()
    try:
        args = parse_args(argv)
        if args.mode_list and not os.path.exists(args.peer_model):
            raise BenchmarkError(
                f"peer model {args.peer_model} not found; make it with: python -m model_tools.export_efficientnet "
                f"--layout float32_nchw --output {args.peer_model}"
                + ("  (or: make models/efficientnet_lite0_float32_nchw.onnx)"
                   if os.path.abspath(args.peer_model) == DEFAULT_PEER_MODEL else ""))
        os.makedirs(args.output, exist_ok=True)
        corpus = ensure_corpus(args.corpus_dir, args.images, args.seed)
    except (BenchmarkError, CorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = os.path.join(args.output, "runs")
    os.makedirs(workdir, exist_ok=True)
    results: List[Dict[str, Any]] = []
    _LOG.info("engine-only: %s, batch %d, %d images", args.engine, args.batch_size, args.images)
    try:
        results.append(measure_engine(args, corpus))
    except Exception as e:  # a broken engine setup is reported in the results; the pipelines still run
        _LOG.error("engine-only failed: %s: %s", type(e).__name__, e)
        results.append({"name": "engine-only", "kind": "engine-only", "images_per_second": None,
                        "complete": False, "scored": 0, "error": f"{type(e).__name__}: {e}"})
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for _ in range(args.repeats):
        entry = run_ours(args, corpus, workdir)
        runs.setdefault(entry["name"], []).append(entry)
        for mode in args.mode_list:
            entry = run_peer(args, corpus, workdir, mode)
            runs.setdefault(entry["name"], []).append(entry)
    results.extend(best_of(entries) for entries in runs.values())
    summary = summarize(args, corpus, results, started)
    paths = report.write(summary, args.output)
    print(report.table(summary))
    print(f"\nwrote {paths['json']} and {paths['png']}")
    return 0 if not summary["flags"] else 1


if __name__ == "__main__":
    sys.exit(main())
