"""Two checkouts of this repository side by side on one GPU machine: the same GPU-decode job on the same
inputs, each configuration run by the old code and then the new, interleaved, so a change is measured
against its baseline on the same host (lent hosts differ by tens of percent).

    python -m benchmarks.compare_trees --old ../before [--configs threads1,threads4] [--dali_threads 16]
    python -m benchmarks.compare_trees --configs threads1,pf16 --variant "pf16=--prefetch 16" --rounds 3

Without ``--old`` every configuration runs on this checkout only: a sweep of job flags (``--variant``), interleaved.
``--rounds`` repeats the whole sequence: the same code's steady rate moved 28% from one pair of runs to the next on
a lent H100 host, so a decision wants the median of several rounds (printed at the end, with each configuration's
steady images/s per round). Every run's rows are compared with the new code's first run (top-1 per image; list
threads1 first to make it the one-thread run) and every listed id must come back once. Prints one line per run and
writes ``OUTPUT/compare_trees.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.concurrency import compare, top1_by_uri
from benchmarks.corpus import ensure_corpus
from benchmarks.gpu import NOT_IN_WORKER_IMAGE, child_pythonpath, hidden_packages
from benchmarks.multi_gpu import accounting, edges, steady_rate, write_id_manifest
from benchmarks.sweep import parse_variant
from benchmarks.throughput import REPO_ROOT, BenchmarkError

THREADS = {"threads1": ["--direct_num_workers", "1"], "threads4": ["--direct_running_mode", "multi_threading", "--direct_num_workers", "4"],
           "threads8": ["--direct_running_mode", "multi_threading", "--direct_num_workers", "8"],
           "threads4_2dec": ["--direct_running_mode", "multi_threading", "--direct_num_workers", "4",
                             "--max_decoders", "2"],
           # Four SDK processes, each with its own engine + decoder and a quarter of the 16 cores for DALI.
           "processes4": ["--direct_running_mode", "multi_processing", "--direct_num_workers", "4",
                          "--dali_threads", "4"]}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default=None, help="The baseline checkout (e.g. `git worktree add ../before REV`). "
                        "Default: none, every configuration runs on this checkout only.")
    parser.add_argument("--configs", default="threads1,threads4",
                        help=f"Comma list of {sorted(THREADS)} and --variant names; a name ending in :new runs the "
                        "new code only.")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="A configuration of job flags, e.g. \"pf16=--prefetch 16\" (repeatable); name it in "
                        "--configs.")
    parser.add_argument("--rounds", type=int, default=1, help="Runs of the whole sequence, interleaved. Default: 1.")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=4, help="Each photo listed this many times, with an id each.")
    parser.add_argument("--dali_threads", type=int, default=-1, help="Default: the job's (cores, at most 16).")
    parser.add_argument("--output", default="benchmark_output/compare_trees")
    parser.add_argument("--corpus_dir", default=None, help="Default: OUTPUT/corpus.")
    parser.add_argument("--model", default=os.path.join(REPO_ROOT, "models", "efficientnet_lite0.onnx"))
    parser.add_argument("--providers", default="cuda", help="Default: cuda (cpu with --decode dali_cpu: a check "
                        "of this benchmark on a machine without a GPU).")
    parser.add_argument("--decode", default="gpu", choices=("gpu", "dali_cpu"))
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--timeout_s", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    args.configurations = dict(THREADS)
    for variant in args.variant:
        try:
            name, flags = parse_variant(variant)
        except BenchmarkError as e:
            parser.error(str(e))
        if ":" in name or "," in name:
            parser.error(f"--variant {variant!r}: a name without ':' or ',' (they separate --configs)")
        if name in THREADS:
            parser.error(f"--variant {name!r}: that name is a built-in configuration; pick another")
        args.configurations[name] = flags
    return args


def summary(results: Dict[str, Dict[str, Any]], rounds: int) -> Dict[str, Dict[str, Any]]:
    """Per code and configuration (``new_threads1``): steady images/s in each round and their median."""
    out: Dict[str, Dict[str, Any]] = {}
    for label, entry in results.items():
        key = label.split("@", 1)[0]
        rate = (entry.get("steady") or {}).get("images_per_second")
        out.setdefault(key, {"steady_per_round": [], "whole_process_per_round": []})
        out[key]["steady_per_round"].append(rate)
        out[key]["whole_process_per_round"].append(entry.get("whole_process_images_per_second"))
    for key, entry in out.items():
        steady = [r for r in entry["steady_per_round"] if r is not None]
        entry["steady_median"] = round(statistics.median(steady), 1) if steady else None
        entry["whole_process_median"] = round(statistics.median(entry["whole_process_per_round"]), 1)
        entry["rounds"] = rounds
    return out


def _run(args, tree: str, label: str, flags: List[str], manifest: str, listed: int,
         reference: Optional[Dict[str, list]]) -> Tuple[Dict[str, Any], Dict[str, list]]:
    out = os.path.join(args.output, label)
    subprocess.run(["rm", "-rf", out], check=False)
    hidden = hidden_packages(args.output, NOT_IN_WORKER_IMAGE)  # started as in the worker image
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=child_pythonpath(hidden, tree))
    cmd = [sys.executable, "-m", "benchmarks.run_timed", out + ".json", "pipelines.classify_images", "--input",
           manifest, "--output", out, "--model", args.model, "--providers", args.providers, "--batch_size",
           str(args.batch_size), "--decode", args.decode, "--dali_threads", str(args.dali_threads), "--progress_every_s", "0.5", *flags]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=args.timeout_s)
    process_s = time.monotonic() - start
    log = done.stdout + done.stderr
    with open(out + ".log", "w") as f:
        f.write(log)
    timing = json.load(open(out + ".json")) if os.path.exists(out + ".json") else {}
    top1 = top1_by_uri(out)
    rows = sum(len(v) for v in top1.values())
    return {"returncode": done.returncode, "process_seconds": round(process_s, 2),
            "import_seconds": timing.get("import_seconds"), "run_seconds": timing.get("wall_seconds"),
            "steady": steady_rate(log), "edges": edges(log, timing.get("import_seconds"), process_s),
            "whole_process_images_per_second": round(rows / process_s, 1), "accounting": accounting(out, listed),
            "top1_vs_reference": compare(reference if reference is not None else top1, top1)}, top1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    args.output = os.path.abspath(args.output)
    old = os.path.abspath(args.old) if args.old else None
    configs = [c.strip().partition(":")[::2] for c in args.configs.split(",") if c.strip()]  # (name, "new" or "")
    for name, _ in configs:
        if name not in args.configurations:
            raise SystemExit(f"unknown configuration {name!r}; choose from {sorted(args.configurations)} "
                             "or add it with --variant NAME=FLAGS")
    corpus = ensure_corpus(args.corpus_dir or os.path.join(args.output, "corpus"), args.images)
    manifest = os.path.join(args.output, "inputs_ids.csv")
    listed = write_id_manifest(manifest, corpus.paths, args.repeat)
    reference, reference_run, results = None, None, {}
    for round_ in range(1, args.rounds + 1):
        for name, only in configs:
            for code, tree in [("new", REPO_ROOT)] + ([] if only == "new" or old is None else [("old", old)]):
                label = f"{code}_{name}" + (f"@{round_}" if args.rounds > 1 else "")
                entry, top1 = _run(args, tree, label, args.configurations[name], manifest, listed, reference)
                if reference is None and code == "new":
                    reference, reference_run = top1, label
                    entry["top1_vs_reference"] = compare(reference, top1)
                results[label] = entry
                print(f"{label}: rc {entry['returncode']}, steady {(entry['steady'] or {}).get('images_per_second')}, "
                      f"whole process {entry['whole_process_images_per_second']} ({entry['process_seconds']} s), "
                      f"edges {entry['edges']}, rows with another top-1 "
                      f"{entry['top1_vs_reference']['rows_with_another_top1']}, every input once "
                      f"{entry['accounting'].get('every_input_once')}", flush=True)
    medians = summary(results, args.rounds)
    for key, entry in medians.items():
        print(f"{key}: steady median {entry['steady_median']} of {entry['steady_per_round']}, whole process median "
              f"{entry['whole_process_median']}", flush=True)
    with open(os.path.join(args.output, "compare_trees.json"), "w") as f:
        json.dump({"old": old, "listed": listed, "rounds": args.rounds, "reference_run": reference_run,
                   "configurations": {name: args.configurations[name] for name, _ in configs},
                   "results": results, "summary": medians}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
