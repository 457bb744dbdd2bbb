"""Concurrent callers of one scorer on a GPU: correct rows first, then speed and GPU memory (the
``concurrency`` run of ``python -m benchmarks.gpu --runs engine,concurrency``).

The same job (``--providers cuda --decode gpu``) in the shapes production uses, side by side:

- ``threads1``: one bundle thread, one process: the reference rows;
- ``defaults``: no flags, what the job chooses on this machine (one bundle thread on a GPU machine);
- ``threads4``: four bundle threads sharing one model in one process (``multi_threading``), their
  batches decoded by one DALI decoder on a thread of its own (``images.decoder_service``, the default);
- ``threads4_2dec``: the same with two such decoders (``--max_decoders 2``);
- ``threads8``, ``threads8_2dec``: eight bundle threads, with one decoder and with two;
- ``processes4``: four SDK processes, an engine and a decoder each (``multi_processing``);
- ``shared4``: four SDK processes sending every batch to one engine per machine through Beam's
  shared-object proxy (``--share_model_across_processes``, the documented Dataflow shape).

For each: every row's top-1 against the reference's top-1 for the same image (a shifted pairing of
images and predictions shows here, as it did before decoders were per caller: 57.8% of rows with
another image's top-1), every listed id back exactly once, steady-state images/s from the progress
lines, whole-run images/s, and GPU memory and utilisation sampled with nvidia-smi.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Dict, Sequence

from benchmarks.multi_gpu import accounting, write_id_manifest
from pipelines.partitions import committed_rows

#: (name, flags) of each configuration, the reference first.
CONFIGURATIONS = (
    ("threads1", ["--direct_num_workers", "1"]),  # explicit: the reference whatever the local defaults become
    ("defaults", []),
    ("threads4", ["--direct_running_mode", "multi_threading", "--direct_num_workers", "4"]),
    ("threads4_2dec", ["--direct_running_mode", "multi_threading", "--direct_num_workers", "4",
                       "--max_decoders", "2"]),
    ("threads8", ["--direct_running_mode", "multi_threading", "--direct_num_workers", "8"]),
    ("threads8_2dec", ["--direct_running_mode", "multi_threading", "--direct_num_workers", "8",
                       "--max_decoders", "2"]),
    ("processes4", ["--direct_running_mode", "multi_processing", "--direct_num_workers", "4"]),
    ("shared4", ["--direct_running_mode", "multi_processing", "--direct_num_workers", "4",
                 "--share_model_across_processes"]),
)


def dali_threads(flags: Sequence[str]) -> int:
    """DALI's CPU threads for a configuration: the machine's cores (at most 16, the job's default) shared by the
    processes that each build a decoder. Before, every configuration got cores / 4, which held the one-process
    ones to a quarter of the decoder's speed (4 threads: ~4k images/s, NOTES.md)."""
    cores = min(16, os.cpu_count() or 1)
    if "multi_processing" in flags and "--share_model_across_processes" not in flags:
        processes = int(flags[list(flags).index("--direct_num_workers") + 1])
        return max(2, cores // processes)
    return cores


#: Two classes whose scores in one row are this close (softmax probability) are a tie: which one ranks first
#: may change with the batch an image is in (the convolutions' sums run in another order), as it does for
#: one corpus photo scoring 0.1483 for two classes. Another image's prediction is never this close.
TIE = 1e-3


def top1_by_uri(out_dir: str) -> Dict[str, list]:
    """Each image's rows, as their top classes with scores, best first: uri -> [((class, score), ...) per row]."""
    rows: Dict[str, list] = collections.defaultdict(list)
    for row in committed_rows(out_dir, "predictions", missing_ok=True):
        rows[row["uri"]].append(tuple((int(c["class_id"]), float(c["score"])) for c in row["top_k"]))
    return rows


def compare(reference: Dict[str, list], other: Dict[str, list], tie: float = TIE) -> Dict[str, Any]:
    """Rows of ``other`` whose top-1 differs from the reference's majority top-1 for that image, less the ties:
    rows that rank the reference's class within ``tie`` of their own first."""
    majority = {uri: collections.Counter(r[0][0] for r in v if r).most_common(1)[0][0]
                for uri, v in reference.items() if v}
    rows = differ = ties = 0
    for uri, values in other.items():
        for row in values:
            rows += 1
            if not row or row[0][0] == majority.get(uri):
                continue
            scores = dict(row)
            if majority.get(uri) in scores and row[0][1] - scores[majority[uri]] <= tie:
                ties += 1
            else:
                differ += 1
    return {"rows": rows, "rows_with_another_top1": differ, "near_ties": ties,
            "share": round(differ / rows, 5) if rows else None}


def differing_rows(reference_dir: str, other_dir: str, limit: int = 8) -> list:
    """Up to ``limit`` rows of ``other_dir`` whose top-1 differs from the reference's majority for the image,
    each with its top classes and scores beside the reference's, so a near tie (the same two classes, scores
    a hair apart) reads apart from another image's prediction (unrelated classes)."""
    reference = top1_by_uri(reference_dir)
    majority = {uri: collections.Counter(r[0][0] for r in v if r).most_common(1)[0][0]
                for uri, v in reference.items() if v}
    ref_rows = {}
    for row in committed_rows(reference_dir, "predictions", missing_ok=True):
        if int(row["top_k"][0]["class_id"]) == majority.get(row["uri"]):
            ref_rows.setdefault(row["uri"], row)
    found = []
    for row in committed_rows(other_dir, "predictions", missing_ok=True):
        if int(row["top_k"][0]["class_id"]) != majority.get(row["uri"]) and len(found) < limit:
            def top(r):
                return [(int(c["class_id"]), round(float(c["score"]), 4)) for c in r["top_k"][:3]] if r else None
            found.append({"uri": row["uri"], "id": row.get("id"), "row": top(row), "reference": top(ref_rows.get(row["uri"]))})
    return found


def selected(names: str = "") -> Sequence:
    """The configurations named in a comma list (all when empty), threads1 always first: it is the reference."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = dict(CONFIGURATIONS)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(known)}")
    return [c for c in CONFIGURATIONS if not wanted or c[0] == "threads1" or c[0] in wanted]


def run_concurrency(args, pipeline: Callable, paths: Sequence[str]) -> Dict[str, Any]:
    """Runs every configuration (or those in ``args.configs``); ``pipeline(name, manifest, extra_flags, env)``
    runs one job and gives its entry with ``steady``, ``edges`` and ``gpu_samples`` (``benchmarks.gpu``)."""
    manifest = os.path.join(args.output, f"inputs_ids_{args.repeat}.csv")
    listed = write_id_manifest(manifest, paths, args.repeat)
    out: Dict[str, Any] = {"listed": listed, "runs": {}}
    reference = None
    for name, flags in selected(getattr(args, "configs", "")):
        extra = ["--decode", "gpu", "--dali_threads", str(dali_threads(flags)), "--progress_every_s", "0.5", *flags]
        entry = pipeline(name, manifest, extra, {})  # with its steady rate, edges and GPU samples
        folder = os.path.join(args.output, name)
        top1 = top1_by_uri(folder)
        if reference is None:
            reference = top1
        entry.update({"flags": flags, "accounting": accounting(folder, listed), "top1_vs_threads1": compare(reference, top1),
                      "differing_rows": differing_rows(os.path.join(args.output, "threads1"), folder)})
        entry.pop("top1", None)
        out["runs"][name] = entry
    return out


def table(result: Dict[str, Any]) -> str:
    lines = ["| configuration | rows with another image's top-1 (vs threads1) | every input once | steady images/s | "
             "whole process images/s | first image / exit after last (s) | GPU memory peak (MiB) | "
             "mean GPU utilisation |", "|---|---|---|---|---|---|---|---|"]
    for name, entry in result["runs"].items():
        cmp_ = entry["top1_vs_threads1"]
        acc = entry["accounting"]
        gpus = entry["gpu_samples"]["gpus"]
        memory = max((g["max_memory_mib"] for g in gpus.values()), default=0)
        util = ", ".join(f"{g['mean_utilisation']:.0f}%" for g in gpus.values())
        lines.append(f"| {name} | {cmp_['rows_with_another_top1']:,} of {cmp_['rows']:,} "
                     f"({cmp_.get('near_ties', 0)} near ties) | "
                     f"{'yes' if acc['every_input_once'] else 'NO'} | "
                     f"{((entry.get('steady') or {}).get('images_per_second') or 0):,.0f} | "
                     f"{entry.get('whole_process_images_per_second') or 0:,.0f} | "
                     f"{(entry.get('edges') or {}).get('first_image_s', '-')} / "
                     f"{(entry.get('edges') or {}).get('after_last_image_s', '-')} | {memory:,.0f} | {util} |")
    return "\n".join(lines)
