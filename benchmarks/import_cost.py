"""What a job's launch spends importing, by module: fresh interpreters under ``python -X importtime``, this
environment against the same with other packages first on the path, interleaved.

    python -m benchmarks.import_cost [--with DIR] [--rounds 5] [--top 12] [--modules onnx,apache_beam,...]

A job imports the same libraries in its launcher and in every SDK process that loads a model, before its first
image, and every import holds the GIL. ``--with DIR`` puts ``DIR`` (e.g. ``pip install --no-deps --target DIR
ml_dtypes==0.7.0``: without ``--no-deps`` pip puts numpy there too, and the runs would compare two numpys) ahead of
the environment's own packages for the second set of runs, so one library's versions
are compared side by side on one host. Prints each run's total, the median of each set, their ratio, and the
modules with the largest median self time (what the module's own code took, its imports left out) in either
set, each set's side by side. ``--modules`` defaults to what a GPU job's launcher and workers import
(:data:`JOB_MODULES`); those that are not importable here are left out and named.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks.throughput import REPO_ROOT  # measured in child interpreters: this one's imports do not count

#: The job module and the libraries its launcher and workers import before the first image.
JOB_MODULES = ("numpy", "onnx", "onnxruntime", "apache_beam", "apache_beam.ml.inference.base",
               "pipelines.classify_images", "nvidia.dali")

_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


def parse_importtime(text: str) -> Tuple[Dict[str, int], int]:
    """``-X importtime``'s stderr -> ({module: self microseconds}, total microseconds of the top-level imports)."""
    own: Dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        self_us, cumulative_us, indent, name = int(match.group(1)), int(match.group(2)), match.group(3), match.group(4)
        own[name] = own.get(name, 0) + self_us
        if len(indent) == 1:  # a top-level import: its cumulative time covers everything it pulled in
            total += cumulative_us
    return own, total


def importable(modules: Sequence[str], path: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """(modules that import here, those that do not), each tried in a fresh interpreter."""
    ok, missing = [], []
    for name in modules:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO_ROOT, env=_env(path),
                              capture_output=True, text=True, timeout=300)
        (ok if done.returncode == 0 else missing).append(name)
    return ok, missing


def _env(path: Optional[str]) -> Dict[str, str]:
    env = dict(os.environ)
    parts = [p for p in (path, REPO_ROOT, env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def run_once(modules: Sequence[str], path: Optional[str] = None) -> Tuple[Dict[str, int], int]:
    """One fresh interpreter importing ``modules`` in order: (self microseconds by module, total microseconds)."""
    code = "; ".join(f"import {name}" for name in modules)
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO_ROOT, env=_env(path),
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"importing {', '.join(modules)} failed:\n{done.stderr[-2000:]}")
    return parse_importtime(done.stderr)


def median_by_module(runs: List[Dict[str, int]]) -> Dict[str, float]:
    names = set().union(*runs) if runs else set()
    return {name: statistics.median(run.get(name, 0) for run in runs) for name in names}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--with", dest="with_path", default=None,
                        help="A folder of packages put first on the path for the second set of runs.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--modules", default=",".join(JOB_MODULES))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.with_path and not os.path.isdir(args.with_path):
        parser.error(f"--with {args.with_path}: no such folder")
    modules, missing = importable([m for m in args.modules.split(",") if m])
    if missing:
        print(f"not importable here, left out: {', '.join(missing)}")
    if not modules:
        raise SystemExit("none of --modules imports here")
    sets = {"here": None, **({"with": args.with_path} if args.with_path else {})}
    runs: Dict[str, List[Tuple[Dict[str, int], int]]] = {name: [] for name in sets}
    for round_ in range(args.rounds):
        for name, path in sets.items():  # interleaved: a host's load moves both sets alike
            own, total = run_once(modules, path)
            runs[name].append((own, total))
            print(f"round {round_ + 1} {name}: {total / 1e6:.3f} s")
    result: Dict[str, object] = {"modules": modules, "left_out": missing}
    medians = {name: statistics.median(total for _, total in entries) for name, entries in runs.items()}
    by_module = {name: median_by_module([own for own, _ in entries]) for name, entries in runs.items()}
    for name, seconds in medians.items():
        print(f"median {name}: {seconds / 1e6:.3f} s")
    if "with" in medians:
        result["ratio_here_over_with"] = medians["here"] / medians["with"]
        print(f"here / with: {result['ratio_here_over_with']:.2f}x")
    print(f"largest self times (median ms): module, here{', with' if 'with' in by_module else ''}")
    largest = {module: max(times.get(module, 0) for times in by_module.values())
               for module in set().union(*by_module.values())}
    top = sorted(largest, key=lambda module: -largest[module])[:args.top]
    for module in top:
        print(f"  {module:60s}" + "".join(f" {by_module[name].get(module, 0) / 1e3:8.1f}" for name in by_module))
    result.update(median_s={name: value / 1e6 for name, value in medians.items()},
                  top_self_ms={module: {name: by_module[name].get(module, 0) / 1e3 for name in by_module}
                               for module in top})
    return result


if __name__ == "__main__":
    main()
