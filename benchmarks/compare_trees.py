"""Two checkouts of this repository side by side on one GPU machine: the same GPU-decode job on the same
inputs, each configuration run by the old code and then the new, interleaved, so a change is measured
against its baseline on the same host (lent hosts differ by tens of percent).

    python -m benchmarks.compare_trees --old ../before [--configs threads1,threads4] [--dali_threads 16]

Every run's rows are compared with the new code's one-thread run (top-1 per image) and every listed id must
come back once. Prints one line per run and writes ``OUTPUT/compare_trees.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.concurrency import compare, top1_by_uri
from benchmarks.corpus import ensure_corpus
from benchmarks.gpu import child_pythonpath, hidden_packages
from benchmarks.multi_gpu import accounting, edges, steady_rate, write_id_manifest
from benchmarks.throughput import REPO_ROOT

THREADS = {"threads1": ["--direct_num_workers", "1"], "threads4": ["--direct_running_mode", "multi_threading", "--direct_num_workers", "4"],
           "threads8": ["--direct_running_mode", "multi_threading", "--direct_num_workers", "8"],
           "threads4_2dec": ["--direct_running_mode", "multi_threading", "--direct_num_workers", "4",
                             "--max_decoders", "2"],
           # Four SDK processes, each with its own engine + decoder and a quarter of the 16 cores for DALI.
           "processes4": ["--direct_running_mode", "multi_processing", "--direct_num_workers", "4",
                          "--dali_threads", "4"]}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="The baseline checkout (e.g. `git worktree add ../before REV`).")
    parser.add_argument("--configs", default="threads1,threads4",
                        help=f"Comma list of {sorted(THREADS)}; a name ending in :new runs the new code only.")
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
    return parser.parse_args(argv)


def _run(args, tree: str, label: str, flags: List[str], manifest: str, listed: int,
         reference: Optional[Dict[str, list]]) -> Tuple[Dict[str, Any], Dict[str, list]]:
    out = os.path.join(args.output, label)
    subprocess.run(["rm", "-rf", out], check=False)
    hidden = hidden_packages(args.output, ["torch"])  # the worker image has no torch
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
            "top1_vs_new_threads1": compare(reference if reference is not None else top1, top1)}, top1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    args.output = os.path.abspath(args.output)
    old = os.path.abspath(args.old)
    corpus = ensure_corpus(args.corpus_dir or os.path.join(args.output, "corpus"), args.images)
    manifest = os.path.join(args.output, "inputs_ids.csv")
    listed = write_id_manifest(manifest, corpus.paths, args.repeat)
    reference, results = None, {}
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        name, _, only = config.partition(":")
        if name not in THREADS:
            raise SystemExit(f"unknown configuration {name!r}; choose from {sorted(THREADS)}")
        for code, tree in [("new", REPO_ROOT)] + ([] if only == "new" else [("old", old)]):
            label = f"{code}_{name}"
            entry, top1 = _run(args, tree, label, THREADS[name], manifest, listed, reference)
            if reference is None and label == "new_threads1":
                reference = top1
                entry["top1_vs_new_threads1"] = compare(reference, top1)
            results[label] = entry
            print(f"{label}: rc {entry['returncode']}, steady {(entry['steady'] or {}).get('images_per_second')}, "
                  f"whole process {entry['whole_process_images_per_second']} ({entry['process_seconds']} s), "
                  f"edges {entry['edges']}, rows with another top-1 "
                  f"{entry['top1_vs_new_threads1']['rows_with_another_top1']}, every input once "
                  f"{entry['accounting'].get('every_input_once')}", flush=True)
    with open(os.path.join(args.output, "compare_trees.json"), "w") as f:
        json.dump({"old": old, "listed": listed, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
