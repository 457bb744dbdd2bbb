"""Staging and an in-pipeline commit: a rerun replaces its partition, a failed run leaves the last good one.

Rows are written to ``OUTPUT/_staging/RUN_ID/``. The commit is the pipeline's last step: a DoFn
whose side inputs are the write results and the run's counts, so it runs once every row is
written (issue 11). It

1. deletes ``OUTPUT/_SUCCESS`` (from here on readers see the partition as incomplete),
2. moves the staged files into ``OUTPUT``,
3. deletes every other output file of this pipeline there (shards of earlier runs with another
   shard count, another format, stale stats),
4. writes ``stats.json`` and ``stats.png``, then ``_SUCCESS`` last: run id, run date, input, counts,
   start and end time, and the files that make up the partition,
5. removes its staging folder and those of earlier runs that died before committing.

It happens inside the job, not in the launching process, because a template launch does not
wait for the job. A run that fails before the commit step changes nothing in ``OUTPUT`` (its
staging folder is cleaned by the next commit). Each step is idempotent, so a retried commit
(a runner retries a failed bundle) finishes the same work. Object stores have no atomic folder
rename: during steps 1-4 (seconds) the partition has no ``_SUCCESS``. Two runs into one partition
at the same time are not supported.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
from typing import Any, Callable, Dict, List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.scored import SCORED_PREFIX, SUCCESS

_LOG = logging.getLogger(__name__)

STAGING = "_staging"
#: Files this pipeline writes into a partition; only these are replaced, anything else is left.
OUTPUT_FILE = re.compile(r"^(predictions-.+\.(jsonl|parquet)|dead_letter-.+\.jsonl|_scored-.+\.jsonl"
                         r"|stats\.json|stats\.png|_SUCCESS)$")
#: The side inputs the commit counts: every listed input, and where each one ended.
COUNTS = ("inputs", "predictions", "dead_letters", "skipped")


@dataclasses.dataclass(frozen=True)
class CommitPlan:
    """One run's partition: where it goes, who it is, and how its stats are written.

    Args:
        output: The partition (``--output`` with ``{date}`` filled).
        run_id: Unique, sortable by start (``pipelines.partitions.new_run_id``).
        run_date: ``YYYY-MM-DD``.
        input: ``--input`` with ``{date}`` filled.
        start_time: ISO 8601 UTC time the job was launched.
        skip_root: ``--skip_scored`` ROOT, or None.
        write_stats: Called on the worker as ``write_stats(output, summary)`` to write stats.json and
            stats.png (given by ``pipelines``, which owns the stats format). None writes none.
    """

    output: str
    run_id: str
    run_date: str
    input: str
    start_time: str
    skip_root: Optional[str] = None
    write_stats: Optional[Callable[[str, Dict[str, Any]], None]] = None

    @property
    def staging(self) -> str:
        return join(self.output, STAGING, self.run_id)


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base.rstrip("/"), *parts) if "://" in base else FileSystems.join(base, *parts)


def _exists(path: str) -> bool:
    return FileSystems.exists(path)


def _list_top(directory: str) -> List[str]:
    """Files directly in ``directory`` (not in sub-folders)."""
    try:
        result = FileSystems.match([join(directory, "*")])[0]
    except Exception:  # a folder that does not exist yet
        return []
    prefix = directory.rstrip("/") + "/"
    return [m.path for m in result.metadata_list if "/" not in m.path[len(prefix):]]


def _delete(paths: List[str]) -> None:
    existing = [p for p in paths if _exists(p)]
    if existing:
        FileSystems.delete(existing)


def _delete_tree(directory: str) -> None:
    """Deletes a folder and everything in it, on any Beam filesystem."""
    if "://" not in directory:
        _delete([directory])
        return
    try:
        files = [m.path for m in FileSystems.match([join(directory, "**")])[0].metadata_list]
    except Exception:
        files = []
    _delete(files)


class _Commit(beam.DoFn):
    def __init__(self, plan: CommitPlan):
        self._plan = plan

    def process(self, _, files, counts):
        plan = self._plan
        staged = sorted(set(files))
        final = [join(plan.output, name) for name in staged]
        # 1. The partition stops being committed before anything in it changes.
        _delete([join(plan.output, SUCCESS)])
        # 2. Staged files into place (a retry finds some already moved).
        for name, target in zip(staged, final):
            source = join(plan.staging, name)
            if _exists(source):
                FileSystems.rename([source], [target])
            elif not _exists(target):
                raise IOError(f"staged file {source} is gone and {target} does not exist: was the staging folder "
                              f"deleted by hand, or did two runs write {plan.output} at once?")
        # 3. Every other output file of this pipeline goes (earlier runs' shards, stats, another format).
        keep = set(final)
        stale = [p for p in _list_top(plan.output)
                 if p not in keep and OUTPUT_FILE.match(p.rsplit("/", 1)[-1]) and not p.endswith("/" + SUCCESS)]
        _delete(stale)
        others = [p for p in _list_top(plan.output) if p not in keep and not OUTPUT_FILE.match(p.rsplit("/", 1)[-1])]
        if others:
            _LOG.warning("left %d files in %s that this pipeline did not write: %s", len(others), plan.output,
                         others[:5])
        for old in (".temp-predictions", ".temp-dead_letter"):  # fileio's folders from before staging existed
            _delete_tree(join(plan.output, old))
        # 4. Stats, then _SUCCESS last.
        summary = self._summary(staged, counts)
        if plan.write_stats is not None:
            plan.write_stats(plan.output, summary)
            summary["files"]["stats"] = ["stats.json", "stats.png"]
        with FileSystems.create(join(plan.output, SUCCESS)) as f:
            f.write((json.dumps(summary, indent=2) + "\n").encode("utf-8"))
        # 5. This run's staging, and that of earlier runs that never committed.
        self._clean_staging()
        _LOG.info("committed %s: %d predictions, %d dead letters, %d skipped", plan.output,
                  summary["predictions"], summary["dead_letters"], summary["skipped"])
        yield summary

    def _summary(self, staged: List[str], counts: Dict[str, int]) -> Dict[str, Any]:
        plan = self._plan
        n = {name: int(counts.get(name, 0)) for name in COUNTS}
        by_kind = {"predictions": [], "dead_letter": [], "scored": []}
        for name in staged:
            kind = "scored" if name.startswith(SCORED_PREFIX) else name.split("-", 1)[0]
            by_kind.setdefault(kind, []).append(name)
        return {
            "run_id": plan.run_id, "run_date": plan.run_date, "input": plan.input, "output": plan.output,
            "skip_scored": plan.skip_root,
            **n, "unaccounted": n["inputs"] - n["predictions"] - n["dead_letters"] - n["skipped"],
            "start_time": plan.start_time,
            "end_time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "files": by_kind,
        }

    def _clean_staging(self):
        plan = self._plan
        root = join(plan.output, STAGING)
        if "://" not in root:
            runs = set(os.listdir(root)) if os.path.isdir(root) else set()
        else:
            try:
                paths = [m.path for m in FileSystems.match([join(root, "**")])[0].metadata_list]
            except Exception:
                paths = []
            prefix = root.rstrip("/") + "/"
            runs = {p[len(prefix):].split("/", 1)[0] for p in paths if p.startswith(prefix)}
        # Run ids sort by start time: a run that started later may still be writing; leave it.
        for run_id in sorted(r for r in runs if r <= plan.run_id):
            _delete_tree(join(root, run_id))
        if "://" not in root and os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)


def _file_name(result) -> str:
    return result.file_name.rsplit("/", 1)[-1]


class CommitPartition(beam.PTransform):
    """The last step: waits for the writes (side inputs) and commits the partition.

    Input: a dict with the write results (``written``: FileResults from ``WriteRows``) and, for
    each name in :data:`COUNTS`, a PCollection of numbers that add up to that count (one per batch
    or block: no element per image). Output: the ``_SUCCESS`` document (one element).
    """

    def __init__(self, plan: CommitPlan):
        super().__init__()
        self._plan = plan

    def expand(self, pcolls):
        counted = [pcolls[name] | f"Sum_{name}" >> beam.CombineGlobally(sum)
                   | f"Name_{name}" >> beam.Map(lambda n, name=name: (name, n)) for name in COUNTS]
        counts = counted | "AllCounts" >> beam.Flatten()
        files = pcolls["written"] | "FileNames" >> beam.Map(_file_name)
        return (pcolls["written"].pipeline | "CommitTrigger" >> beam.Create([None])
                | "Commit" >> beam.ParDo(_Commit(self._plan), files=beam.pvalue.AsList(files),
                                         counts=beam.pvalue.AsDict(counts)))
