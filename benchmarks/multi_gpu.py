"""One GPU vs two, measured side by side in one run: the ``gpus`` run of
``python -m benchmarks.throughput --device gpu --runs engine,gpus``.

The same job (``pipelines.classify_images --providers cuda --decode gpu``) runs with the same number
of SDK processes (``--direct_running_mode multi_processing --direct_num_workers P``) once with one
GPU visible (``CUDA_VISIBLE_DEVICES``) and once with two. Every process loads one engine and one DALI
decoder on the next GPU (``engines.devices``: round-robin), so with two GPUs half the processes use
each. For every run:

- steady-state images/s from the job's progress lines (between 10% and 90% of the images, so
  worker start-up and the tail are out), plus the whole-run figures;
- per-GPU utilisation and memory sampled with ``nvidia-smi`` every 0.5 s while it runs (a timeline
  per GPU and the mean while the job was on the GPUs), and the images each GPU's engines scored
  (stats.json's ``images_per_device``);
- inputs = predictions + dead letters, and no image scored twice: the manifest gives each listed
  image an id (``uri,id``) and each id must come back exactly once.

With one process (``P`` = 1) the job runs in one process on one GPU: the single-process baseline.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pipelines.partitions import committed_rows, committed_stats

_PROGRESS = re.compile(r"progress: (\d+) images scored.* after ([0-9.]+) s")


def gpu_indices() -> List[str]:
    """The GPUs nvidia-smi lists (index strings), or [] without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


class GpuSampler:
    """Samples every GPU's utilisation (%) and memory used (MiB) with nvidia-smi while a block runs.

    ``samples`` holds ``(seconds since start, gpu index, utilisation, memory MiB)``.
    """

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.samples: List[Tuple[float, int, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)

    def _loop(self):
        start = time.monotonic()
        while not self._stop.wait(self.every_s):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            t = round(time.monotonic() - start, 2)
            for line in out.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 3 and parts[0].isdigit():
                    try:
                        self.samples.append((t, int(parts[0]), float(parts[1]), float(parts[2])))
                    except ValueError:  # "[N/A]"
                        pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=15)

    def summary(self) -> Dict[str, Any]:
        """Per GPU: mean utilisation while the job was on the GPUs (first to last sample where any GPU
        was busy), its peak, peak memory, and a timeline of utilisation (one value per second)."""
        busy = [t for t, _, util, _ in self.samples if util > 0]
        if not busy:
            return {"window_seconds": 0, "gpus": {}}
        first, last = min(busy), max(busy)
        gpus: Dict[str, Any] = {}
        for index in sorted({i for _, i, _, _ in self.samples}):
            mine = [(t, u, m) for t, i, u, m in self.samples if i == index]
            window = [u for t, u, _ in mine if first <= t <= last]
            timeline: Dict[int, List[float]] = {}
            for t, u, _ in mine:
                timeline.setdefault(int(t), []).append(u)
            gpus[f"gpu{index}"] = {
                "mean_utilisation": round(sum(window) / len(window), 1) if window else 0.0,
                "max_utilisation": max((u for _, u, _ in mine), default=0.0),
                "max_memory_mib": max((m for _, _, m in mine), default=0.0),
                "utilisation_per_second": [round(sum(v) / len(v)) for _, v in sorted(timeline.items())],
            }
        return {"window_seconds": round(last - first, 1), "gpus": gpus}


def steady_rate(log_text: str, low: float = 0.1, high: float = 0.9) -> Optional[Dict[str, float]]:
    """Images/s between the progress lines at ``low`` and ``high`` of the final count.

    The job prints ``progress: N images scored, ... after T s`` every ``--progress_every_s``.
    Returns None when fewer than two lines fall in the window.
    """
    points = [(int(m.group(1)), float(m.group(2))) for m in _PROGRESS.finditer(log_text)]
    if not points:
        return None
    total = points[-1][0]
    inside = [(n, t) for n, t in points if low * total <= n <= high * total]
    if len(inside) < 2 or inside[-1][1] <= inside[0][1]:
        return None
    (n0, t0), (n1, t1) = inside[0], inside[-1]
    return {"images_per_second": round((n1 - n0) / (t1 - t0), 1), "from_images": n0, "to_images": n1,
            "seconds": round(t1 - t0, 2)}


_STAMPED_PROGRESS = re.compile(r"\[\+([0-9.]+) s\] progress: (\d+) images scored")


def edges(log_text: str, import_seconds: Optional[float], process_seconds: Optional[float]
          ) -> Optional[Dict[str, float]]:
    """Seconds from the process's start to the first scored image, and from the last one to its exit, from the
    progress lines ``benchmarks.run_timed`` stamps with the process's clock (each late by up to one
    ``--progress_every_s``). Without stamps, the progress lines' own clock, which starts after the imports and
    the job's start checks: the first figure is then early and the second late by the checks' time.
    """
    stamped = [(int(n), float(t)) for t, n in _STAMPED_PROGRESS.findall(log_text)]
    points = stamped or [(int(m.group(1)), float(m.group(2)) + (import_seconds or 0.0))
                         for m in _PROGRESS.finditer(log_text)]
    if not points or points[-1][0] == 0 or process_seconds is None or (not stamped and import_seconds is None):
        return None
    total = points[-1][0]
    first = next(t for n, t in points if n > 0)
    last = next(t for n, t in points if n == total)
    return {"first_image_s": round(first, 2), "after_last_image_s": round(max(0.0, process_seconds - last), 2),
            "clock": "process" if stamped else "progress lines"}


def write_id_manifest(path: str, paths: Sequence[str], repeat: int) -> int:
    """A ``uri,id`` manifest listing ``paths`` ``repeat`` times, each entry with its own id."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "id"])
        for r in range(repeat):
            for i, p in enumerate(paths):
                writer.writerow([p, f"{r}-{i}"])
    return len(paths) * repeat


def accounting(out_dir: str, expected: int) -> Dict[str, Any]:
    """Every listed id back exactly once, as a prediction or a dead letter."""
    ids = [row.get("id") for kind in ("predictions", "dead_letter")
           for row in committed_rows(out_dir, kind, missing_ok=True)]
    unique = set(ids)
    return {"listed": expected, "rows": len(ids), "distinct_ids": len(unique),
            "scored_twice": len(ids) - len(unique), "missing": expected - len(unique - {None}),
            "every_input_once": len(ids) == expected == len(unique) and None not in unique}


def configurations(processes: Sequence[int], gpus: List[str]) -> List[Tuple[int, int]]:
    """(GPUs, processes) pairs: 1 means one process on one GPU; each P > 1 runs on one GPU and on two."""
    configs = []
    for p in processes:
        configs.append((1, p))
        if p > 1 and len(gpus) >= 2:
            configs.append((2, p))
    return configs


def run_gpus(args, pipeline, paths: Sequence[str]) -> Dict[str, Any]:
    """Runs every configuration; ``pipeline(name, manifest, extra_flags, env)`` runs one job and gives its
    entry with ``steady`` and ``gpu_samples`` (``benchmarks.gpu``).

    Returns the runs and the two-vs-one ratios.
    """
    gpus = gpu_indices()
    cores = os.cpu_count() or 1
    processes = [int(p) for p in str(args.processes).split(",") if p.strip()]
    out: Dict[str, Any] = {"gpus_visible": gpus, "cores": cores, "runs": {}}
    for n_gpus, procs in configurations(processes, gpus):
        name = f"gpus{n_gpus}_procs{procs}"
        repeat = args.repeat if procs == 1 else args.gpus_repeat
        manifest = os.path.join(args.output, f"inputs_ids_{repeat}.csv")
        listed = write_id_manifest(manifest, paths, repeat)
        threads = max(2, min(16, cores // procs))  # DALI CPU threads per process: the machine's cores shared
        extra = ["--decode", "gpu", "--dali_threads", str(threads), "--progress_every_s", "1"]
        if procs > 1:
            extra += ["--direct_running_mode", "multi_processing", "--direct_num_workers", str(procs)]
        env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus[:n_gpus])} if gpus else {}
        entry = pipeline(name, manifest, extra, env)  # with its steady rate and GPU samples
        entry.update({"gpus": n_gpus, "processes": procs, "dali_threads": threads, "env": env,
                      "accounting": accounting(os.path.join(args.output, name), listed)})
        if os.path.exists(os.path.join(args.output, name, "_SUCCESS")):
            stats = committed_stats(os.path.join(args.output, name))
            entry["images_per_device"] = stats.get("images_per_device")
            entry["unaccounted"] = stats.get("unaccounted")
        entry.pop("top1", None)
        out["runs"][name] = entry
    out["ratios"] = two_vs_one(out["runs"])
    return out


def _steady(entry: Optional[Dict[str, Any]]) -> Optional[float]:
    return ((entry or {}).get("steady") or {}).get("images_per_second")


def two_vs_one(runs: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Two GPUs / one GPU at the same process count (steady state and whole run), and best vs best."""
    ratios: Dict[str, Any] = {}
    for name, entry in runs.items():
        if entry.get("gpus") != 2:
            continue
        one = runs.get(f"gpus1_procs{entry['processes']}")
        if _steady(entry) and _steady(one):
            ratios[f"procs{entry['processes']}_steady"] = round(_steady(entry) / _steady(one), 3)
        if entry.get("run_images_per_second") and (one or {}).get("run_images_per_second"):
            ratios[f"procs{entry['processes']}_run"] = round(entry["run_images_per_second"]
                                                             / one["run_images_per_second"], 3)
    best = {n: max((_steady(e) or 0) for e in runs.values() if e.get("gpus") == n) for n in (1, 2)
            if any(e.get("gpus") == n for e in runs.values())}
    if best.get(1) and best.get(2):
        ratios["best_two_vs_best_one_steady"] = round(best[2] / best[1], 3)
    return ratios


def table(result: Dict[str, Any]) -> str:
    lines = ["| GPUs | processes | steady images/s | run images/s | images per GPU | mean GPU utilisation | "
             "every input once |", "|---|---|---|---|---|---|---|"]
    for entry in result["runs"].values():
        util = ", ".join(f"{g} {v['mean_utilisation']:.0f}%" for g, v in entry["gpu_samples"]["gpus"].items())
        devices = ", ".join(f"{k} {v:,}" for k, v in (entry.get("images_per_device") or {}).items())
        acc = entry["accounting"]
        lines.append(f"| {entry['gpus']} | {entry['processes']} | {_steady(entry) or 0:,.0f} | "
                     f"{entry.get('run_images_per_second') or 0:,.0f} | {devices} | {util} | "
                     f"{'yes' if acc['every_input_once'] else 'NO'} ({acc['rows']:,} rows, "
                     f"{acc['scored_twice']} twice, {acc['missing']} missing) |")
    return "\n".join(lines)
