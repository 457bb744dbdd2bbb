"""Our pipeline under several settings, side by side on one corpus: the experiments behind NOTES.md.

    python -m benchmarks.sweep --images 5000 --repeats 2 \\
        --variant "default=" --variant "fixed32=--min_batch_size 32" \\
        --variant "ort12=--min_batch_size 32 --intra_op_threads 12"

Each variant is ``NAME=ARGUMENTS`` (arguments for ``pipelines.classify_images``, shell-quoted,
added after ``--input``, ``--output`` and ``--batch_size``). Every run is a fresh interpreter
(``benchmarks.run_timed``, imports excluded from the clock, exactly as ``benchmarks.throughput``
times "ours"); repeats are interleaved (A B C A B C) so a slow spell of the machine hits every
variant alike. Prints a table (best images/s per variant, its ratio to the first variant, mean
batch size, summed inference seconds, cores used) and writes ``OUTPUT/sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.corpus import ensure_corpus
from benchmarks.throughput import BenchmarkError, _finish_run, run_child
from pipelines.partitions import committed_rows

_LOG = logging.getLogger("benchmarks.sweep")


def parse_variant(text: str) -> Tuple[str, List[str]]:
    """``"NAME=ARGS"`` -> (name, argv)."""
    name, sep, args = text.partition("=")
    if not sep or not name.strip():
        raise BenchmarkError(f"--variant must be NAME=ARGUMENTS (ARGUMENTS may be empty), got {text!r}")
    try:
        return name.strip(), shlex.split(args)
    except ValueError as e:
        raise BenchmarkError(f"--variant {name}: arguments are not valid shell quoting ({e}): {args!r}")


def run_variant(name: str, extra: List[str], corpus, workdir: str, batch_size: int, timeout_s: float,
                repeat: int) -> Dict[str, Any]:
    out = os.path.join(workdir, f"{name}-{repeat}")
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--input", corpus.glob, "--output", out, "--batch_size", str(batch_size), "--progress_every_s", "0"]
    argv += extra
    child = run_child(f"{name}-{repeat}", "pipelines.classify_images", argv, workdir, timeout_s)
    rows = committed_rows(out, "predictions", missing_ok=True)
    top1 = {os.path.basename(r["uri"]): int(r["top_k"][0]["class_id"]) for r in rows if r.get("top_k")}
    entry = _finish_run({"name": name, "kind": "ours", "args": argv, "output": out}, child, len(corpus.paths), top1)
    stats = (child["timing"] or {}).get("stats") or {}
    entry["mean_batch_size"] = stats.get("mean_batch_size")
    entry["inference_seconds"] = (stats.get("stage_seconds") or {}).get("inference")
    entry["complete"] = entry.get("complete", False) and len(rows) == len(corpus.paths)
    entry.pop("_top1", None)
    shutil.rmtree(out, ignore_errors=True)
    return entry


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="Corpus size. Default: 2000.")
    parser.add_argument("--batch_size", type=int, default=32, help="--batch_size for every variant. Default: 32.")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=ARGS",
                        help="A setting to measure (repeatable); the first is the reference.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per variant, interleaved. Default: 2.")
    parser.add_argument("--output", default="benchmark_output", help="Output directory. Default: benchmark_output.")
    parser.add_argument("--corpus_dir", default=None, help="Corpus cache directory. Default: OUTPUT/corpus.")
    parser.add_argument("--timeout_s", type=float, default=900.0, help="Limit per run, seconds. Default: 900.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        variants = [parse_variant(v) for v in args.variant]
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    corpus = ensure_corpus(args.corpus_dir or os.path.join(args.output, "corpus"), args.images)
    workdir = os.path.join(args.output, "sweep")
    os.makedirs(workdir, exist_ok=True)
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name, _ in variants}
    for repeat in range(args.repeats):
        for name, extra in variants:
            entry = run_variant(name, extra, corpus, workdir, args.batch_size, args.timeout_s, repeat)
            runs[name].append(entry)
            _LOG.info("%s #%d: %s images/s (complete: %s)", name, repeat, entry.get("images_per_second"),
                      entry.get("complete"))
    table = []
    reference = None
    for name, extra in variants:
        good = [r for r in runs[name] if r.get("complete") and r.get("images_per_second")]
        best = max(good, key=lambda r: r["images_per_second"]) if good else None
        ips = best["images_per_second"] if best else None
        if reference is None:
            reference = ips
        table.append({"variant": name, "args": " ".join(shlex.quote(a) for a in extra),
                      "images_per_second": ips, "all": [r.get("images_per_second") for r in runs[name]],
                      "vs_first": round(ips / reference, 3) if ips and reference else None,
                      "mean_batch_size": best and best.get("mean_batch_size"),
                      "inference_seconds": best and best.get("inference_seconds"),
                      "cores_used": best and (best.get("cpu") or {}).get("own_cpu_cores")})
    print(f"\n{len(corpus.paths)} images, batch {args.batch_size}, {os.cpu_count()} cores, best of {args.repeats}")
    print(f"{'variant':<14}{'images/s':>10}{'vs first':>10}{'batch':>7}{'infer s':>9}{'cores':>7}  all runs / args")
    for row in table:
        print(f"{row['variant']:<14}{row['images_per_second'] or 'FAILED':>10}{row['vs_first'] or '':>10}"
              f"{row['mean_batch_size'] or '':>7}{row['inference_seconds'] or '':>9}{row['cores_used'] or '':>7}  "
              f"{row['all']} {row['args']}")
    with open(os.path.join(args.output, "sweep.json"), "w") as f:
        json.dump({"images": len(corpus.paths), "batch_size": args.batch_size, "cores": os.cpu_count(),
                   "repeats": args.repeats, "table": table, "runs": runs}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
