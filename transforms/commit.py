"""Each run writes into a folder of its own; one compare-and-swap of ``_SUCCESS`` commits it.

Layout of a partition (``--output``)::

    OUTPUT/_SUCCESS                      the commit record: which run, its counts, its files
    OUTPUT/run-RUN_ID/predictions-*.jsonl (or .parquet), dead_letter-*.jsonl, _scored-*.jsonl,
                      stats.json, stats.png

The protocol follows Delta Lake's (data files first, then one put-if-absent of the log entry) with
``_SUCCESS`` as the only log entry:

1. When the run is launched, the version of ``OUTPUT/_SUCCESS`` is read: its GCS generation, or a
   hash of its content elsewhere (``CommitPlan.base``; absent when there is none).
2. Every row is written into ``OUTPUT/run-RUN_ID/``, a folder no other run touches. Nothing a
   reader follows changes.
3. The commit step (the pipeline's last, a DoFn whose side inputs are the write results and the
   counts) flushes the run's files, writes ``stats.json``/``stats.png`` into the run folder, and
   replaces ``_SUCCESS`` only if it is still at version ``base``
   (:func:`engines.storage.replace_if`: ``ifGenerationMatch`` on GCS; a lock, fsync and atomic
   rename on local disk). If another run committed meanwhile, this run fails with
   :class:`CommitConflict` naming that run, and commits nothing.
4. Only then are the files of the run it replaced removed, with the leftovers of runs that died
   (run folders that sort at or before this run, fileio temp folders, temporary files, and the
   files of older versions of this pipeline). A failure here is logged, not raised: the commit
   has happened, and the next commit removes what is left.

A reader that follows ``_SUCCESS`` therefore sees the previous run or the new one, whole, at every
instant, also after kill -9 or a full disk at any point; a retried commit finds its own record and
only cleans up. docs/scheduling.md says which guarantee holds on which filesystem.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
from typing import Any, Callable, Dict, List, Optional

import apache_beam as beam

from engines import storage
from transforms.scored import SCORED_PREFIX, SUCCESS

_LOG = logging.getLogger(__name__)

#: A run's folder in the partition: ``run-`` + its run id (run ids sort by launch time).
RUN_PREFIX = "run-"
#: The staging folder of the versions of this pipeline that moved files into place at commit.
LEGACY_STAGING = "_staging"
#: Files the earlier, move-into-place versions of this pipeline wrote at the partition's top.
LEGACY_OUTPUT_FILE = re.compile(r"^(predictions-.+\.(jsonl|parquet)|dead_letter-.+\.jsonl|_scored-.+\.jsonl"
                                r"|stats\.json|stats\.png)$")
#: Temporary files of writes that died (engines.storage writes ``NAME.tmp-HEX`` then renames).
TEMP_FILE = re.compile(r"^(_SUCCESS|stats\.json|stats\.png)\.tmp-[0-9a-f]+$")
#: fileio's temporary folders (inside a run folder; at the top in older versions).
FILEIO_TEMP = ".temp-"
#: The side inputs the commit counts: every listed input, and where each one ended.
COUNTS = ("inputs", "predictions", "dead_letters", "skipped")


def run_folder_name(run_id: str) -> str:
    return RUN_PREFIX + run_id


@dataclasses.dataclass(frozen=True)
class CommitPlan:
    """One run's partition: where it goes, who it is, what it replaces, and how its stats are written.

    Args:
        output: The partition (``--output`` with ``{date}`` filled), canonical.
        run_id: Unique, sortable by start (``pipelines.partitions.new_run_id``).
        run_date: ``YYYY-MM-DD``.
        input: ``--input`` with ``{date}`` filled.
        start_time: ISO 8601 UTC time the job was launched.
        skip_root: ``--skip_scored`` ROOT, or None.
        write_stats: Called on the worker as ``write_stats(run_folder, summary)`` to write
            stats.json and stats.png (given by ``pipelines``, which owns the stats format). None
            writes none.
        base: Version token of ``OUTPUT/_SUCCESS`` when the run was launched
            (:func:`engines.storage.read_versioned`); the commit happens only over that version.
            Default: absent (no partition yet).
        replaces: Run id in that ``_SUCCESS``, or None (none, or not a record of this pipeline).
        model: What the record says of the model that made the rows (identity, file, sha256, how
            outputs became rows), or None.
    """

    output: str
    run_id: str
    run_date: str
    input: str
    start_time: str
    skip_root: Optional[str] = None
    write_stats: Optional[Callable[[str, Dict[str, Any]], None]] = None
    base: str = storage.ABSENT
    replaces: Optional[str] = None
    model: Optional[Dict[str, Any]] = None

    @property
    def run_folder(self) -> str:
        return storage.join(self.output, run_folder_name(self.run_id))

    @property
    def success(self) -> str:
        return storage.join(self.output, SUCCESS)


class CommitConflict(RuntimeError):
    """Another run committed the partition after this run was launched; this run committed nothing.

    Args:
        plan: This run's plan.
        other: The ``_SUCCESS`` record found there now; ``{}`` when the file is there but is not a
            record of this pipeline; None only when it is gone.
    """

    def __init__(self, plan: CommitPlan, other: Optional[Dict[str, Any]]):
        if other and other.get("run_id"):
            who = (f"run {other['run_id']} (launched {other.get('start_time', '?')}, input "
                   f"{other.get('input', '?')})")
        elif other is None:
            who = "someone who deleted its _SUCCESS"
        else:
            who = "a writer whose _SUCCESS is not a record of this pipeline"
        super().__init__(
            f"{plan.output} was committed by {who} while this run ({plan.run_id}) was running; this run committed "
            f"nothing (its files in {run_folder_name(plan.run_id)} are removed by the next commit). Two runs wrote "
            f"one --output at once: run this one again alone to replace that result, or give each run its own "
            f"--output")


def parse_record(data: Optional[bytes]) -> Optional[Dict[str, Any]]:
    """A ``_SUCCESS`` document of this pipeline, or None (missing, truncated, empty or foreign)."""
    if not data:
        return None
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("run_id"), str) \
            or not isinstance(document.get("files"), dict) \
            or not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in document["files"].values()):
        return None
    return document


def listed_files(record: Dict[str, Any]) -> List[str]:
    """The paths (relative to the partition) a ``_SUCCESS`` record lists."""
    return [name for names in record.get("files", {}).values() for name in names]


class _Commit(beam.DoFn):
    def __init__(self, plan: CommitPlan):
        self._plan = plan

    def process(self, _, files, counts, sinks=()):
        plan = self._plan
        token, current = storage.read_versioned(plan.success)
        record = parse_record(current)
        if record is not None and record.get("run_id") == plan.run_id:
            _LOG.info("%s is already committed by this run (a retried commit step); cleaning up", plan.output)
            # Not the folders of other runs: a retry can come minutes later, when a run launched
            # after this commit may be writing (its id can sort earlier if its launcher's clock lags).
            self._clean(record, others=False)
            yield record
            return
        if token != plan.base:
            raise CommitConflict(plan, (record or {}) if current is not None else None)
        staged = sorted(set(files))
        folder = plan.run_folder
        missing = [name for name in staged if not storage.exists(storage.join(folder, name))]
        if missing:
            raise IOError(f"{storage.join(folder, missing[0])} and {len(missing) - 1} other file(s) this run wrote are "
                          f"gone: was {folder} deleted by hand, or cleaned by another run's commit? Nothing was "
                          f"committed; run the job again")
        for name in staged:  # kill -9 keeps written pages; a power loss needs them on disk first
            storage.fsync_file(storage.join(folder, name))
        summary = self._summary(staged, counts, record)
        summary.update(sinks)  # what other sinks wrote, e.g. the BigQuery partition (transforms/bigquery.py)
        if plan.write_stats is not None:
            plan.write_stats(folder, summary)
            summary["files"]["stats"] = [f"{run_folder_name(plan.run_id)}/{n}" for n in ("stats.json", "stats.png")]
        if not storage.is_url(folder):
            storage.fsync_folder(folder)
        try:
            storage.replace_if(plan.success, (json.dumps(summary, indent=2) + "\n").encode("utf-8"), plan.base)
        except storage.VersionMismatch as e:
            raise CommitConflict(plan, (parse_record(e.current) or {}) if e.current is not None else None) from None
        _LOG.info("committed %s: %d predictions, %d dead letters, %d skipped", plan.output,
                  summary["predictions"], summary["dead_letters"], summary["skipped"])
        self._clean(summary)
        yield summary

    def _summary(self, staged: List[str], counts: Dict[str, int], replaced: Optional[Dict[str, Any]]):
        plan = self._plan
        n = {name: int(counts.get(name, 0)) for name in COUNTS}
        by_kind: Dict[str, List[str]] = {"predictions": [], "dead_letter": [], "scored": []}
        for name in staged:
            kind = "scored" if name.startswith(SCORED_PREFIX) else name.split("-", 1)[0]
            by_kind.setdefault(kind, []).append(f"{run_folder_name(plan.run_id)}/{name}")
        return {
            "run_id": plan.run_id, "run_date": plan.run_date, "input": plan.input, "output": plan.output,
            "skip_scored": plan.skip_root,
            **n, "unaccounted": n["inputs"] - n["predictions"] - n["dead_letters"] - n["skipped"],
            "start_time": plan.start_time,
            "end_time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "run_folder": run_folder_name(plan.run_id),
            "model": plan.model,
            "files": by_kind,
            # What this commit replaced: a retried commit (or the next one) can still remove it.
            "replaced": {"run_id": replaced["run_id"], "files": listed_files(replaced)} if replaced else None,
        }

    def _clean(self, record: Dict[str, Any], others: bool = True) -> None:
        """Removes what the committed ``record`` does not list; logs, never raises (the commit is done)."""
        try:
            removed, foreign = clean_partition(self._plan.output, record, others)
        except Exception as e:  # a full disk, a lost permission: the next commit cleans up
            _LOG.warning("committed %s, but removing the files it replaced failed (%s); the next commit removes them",
                         self._plan.output, e)
            return
        if removed:
            _LOG.info("removed %d replaced or leftover entries from %s", len(removed), self._plan.output)
        if foreign:
            _LOG.warning("left %d entries in %s that this pipeline did not write: %s", len(foreign),
                         self._plan.output, foreign[:5])


def clean_partition(output: str, record: Dict[str, Any], others: bool = True):
    """Deletes everything in ``output`` that this pipeline wrote and ``record`` (the committed
    ``_SUCCESS``) does not list.

    Removed: the folders of runs that sort at or before the committed one (the run it replaced,
    runs that died or lost the commit), the run it replaced even when it sorts later (clocks of
    two launchers differ), temporary files and fileio temp folders, and the top-level files and
    ``_staging`` folder of the versions of this pipeline that moved files into place.
    Left: run folders that sort later (a run that may still be writing), and files this pipeline
    did not write. A run that sorts earlier and is still writing lost the commit already (it
    started from the version this commit replaced); it fails when its files vanish or at its
    commit, and its launcher names this run (``pipelines.classify_images``).

    Args:
        others: Also remove the folders of other runs that sort earlier. Default True.

    Returns:
        (removed entries, foreign entries), as names in ``output``.
    """
    run_id = record["run_id"]
    mine = run_folder_name(run_id)
    replaced = (record.get("replaced") or {}).get("run_id")
    removed, foreign = [], []
    for name in storage.list_children(output):
        path = storage.join(output, name)
        if name == SUCCESS:
            continue
        if name == mine:
            for inner in storage.list_children(path):
                if inner.startswith(FILEIO_TEMP) or TEMP_FILE.match(inner):
                    storage.delete_tree(storage.join(path, inner))
                    removed.append(f"{name}/{inner}")
            continue
        if name.startswith(RUN_PREFIX):
            other = name[len(RUN_PREFIX):]
            if other == replaced or (others and other <= run_id):
                storage.delete_tree(path)
                removed.append(name)
            continue
        if name == LEGACY_STAGING or name.startswith(FILEIO_TEMP) or LEGACY_OUTPUT_FILE.match(name) \
                or TEMP_FILE.match(name):
            storage.delete_tree(path)
            removed.append(name)
            continue
        foreign.append(name)
    return removed, foreign


def _file_name(result) -> str:
    return result.file_name.rsplit("/", 1)[-1]


class CommitPartition(beam.PTransform):
    """The last step: waits for the writes (side inputs) and commits the partition.

    Input: a dict with the write results (``written``: FileResults from ``WriteRows`` into the
    plan's run folder) and, for each name in :data:`COUNTS`, a PCollection of numbers that add up
    to that count (one per batch or block: no element per image); optionally ``sinks``, ``(name,
    entry)`` pairs from other sinks, each emitted once that sink's data is durable, which the
    record carries under ``name``. Output: the ``_SUCCESS`` document (one element).
    """

    def __init__(self, plan: CommitPlan):
        super().__init__()
        self._plan = plan

    def expand(self, pcolls):
        # One keyed sum for every count, not a CombineGlobally each: every grouping is a stage the runner
        # runs after the last image (a local multi-threaded run spent ~0.1 s a stage there); a count with
        # no elements is absent and reads as 0 in _Commit.
        named = [pcolls[name] | f"Name_{name}" >> beam.Map(lambda n, name=name: (name, n)) for name in COUNTS]
        counts = named | "AllCounts" >> beam.Flatten() | "SumCounts" >> beam.CombinePerKey(sum)
        files = pcolls["written"] | "FileNames" >> beam.Map(_file_name)
        sinks = {"sinks": beam.pvalue.AsDict(pcolls["sinks"])} if "sinks" in pcolls else {}
        return (pcolls["written"].pipeline | "CommitTrigger" >> beam.Create([None])
                | "Commit" >> beam.ParDo(_Commit(self._plan), files=beam.pvalue.AsList(files),
                                         counts=beam.pvalue.AsDict(counts), **sinks))
