"""What a run scored, and ``--skip_scored``: skip inputs a committed run already scored (issue 11).

Every input that exists gets a fingerprint when its batch is checked, before it is read: its size
and modification time (on GCS, the object's ``updated`` time, which every new generation changes).
A committed partition records, in ``_scored-*.jsonl``, ``{"uri", "size", "mtime"}`` for each
input it fingerprinted. An input counts as scored by that partition when its outcome depends only
on its bytes: a prediction, or a dead letter from decoding (a corrupt or unsupported file stays so
until it changes). Inputs with a ``read``, ``inference`` or ``manifest`` dead letter in the same
partition do not count, so the next run tries them again; that rule is applied when a later run
reads the records (:class:`_ReadPartition`), because deciding it while writing would need a join
of every input with its outcome, one Beam element per image (issue 9 took those out).

With ``--skip_scored ROOT``, inputs whose URI and fingerprint a committed partition under ROOT
scored (one with ``_SUCCESS``, nothing unaccounted; the partition this run replaces does not
count) are skipped and counted; a changed file has a new fingerprint and is scored again.

Refs travel in lists (one Beam element per batch); so do the fingerprint records and the skipped
counts. The records of earlier runs reach the check as a side input, one dict per partition: each
worker holds every URI scored under ROOT (about 200 bytes each), so point ROOT at the partitions
that matter (e.g. a year of daily folders), not at a bucket's root.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.timing import NAMESPACE

FINGERPRINTS = "fingerprints"
SKIPPED = "skipped"
SCORED_PREFIX = "_scored"
SUCCESS = "_SUCCESS"
#: Dead-letter stages whose outcome depends only on the file's bytes (recorded as scored).
SETTLED_DEAD_LETTER_STAGES = ("decode",)
#: Threads that fetch remote objects' metadata for one batch (a GCS metadata request takes tens
#: of milliseconds; a batch of 256 in series would take seconds).
REMOTE_STAT_THREADS = 16

Fingerprint = Tuple[int, float]


def fingerprint(uri: str) -> Optional[Dict[str, float]]:
    """``{"size", "mtime"}`` of the file at ``uri``, or None when it cannot be stat'ed (it then
    becomes a read dead letter downstream, and is not recorded as scored)."""
    try:
        if "://" not in uri:
            st = os.stat(uri)  # follows symlinks, as reading does
            if not stat.S_ISREG(st.st_mode):
                return None  # a FIFO or device: the reader refuses it with the reason
            size, mtime = st.st_size, st.st_mtime
        else:
            metadata = FileSystems.get_filesystem(uri).metadata(uri)
            size, mtime = metadata.size_in_bytes, metadata.last_updated_in_seconds
    except Exception:  # a missing or unreadable file: the reader reports it with the reason
        return None
    return {"size": int(size), "mtime": round(float(mtime), 3)}


def _same(fp: Dict[str, float], prior: Fingerprint) -> bool:
    return fp["size"] == prior[0] and abs(fp["mtime"] - prior[1]) < 1e-3


class _CheckBatch(beam.DoFn):
    """A list of refs -> the list to score (main), one block of fingerprint records
    (``fingerprints``) and the number skipped (``skipped``), each only when not empty.

    Args:
        skip: Whether a ``prior`` side input (one ``{uri: [[size, mtime], ...]}`` per committed
            partition) is given.
    """

    def __init__(self, skip: bool):
        self._skip = skip

    def setup(self):
        self._skipped = Metrics.counter(NAMESPACE, "skipped")
        self._pool = None
        self._prior = None

    def _fingerprints(self, refs: Sequence) -> List[Optional[Dict[str, float]]]:
        if not any("://" in ref.uri for ref in refs):
            return [fingerprint(ref.uri) for ref in refs]
        if self._pool is None:
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(REMOTE_STAT_THREADS, thread_name_prefix="stat")
        return list(self._pool.map(fingerprint, [ref.uri for ref in refs]))

    def _merged(self, prior) -> Dict[str, List[Fingerprint]]:
        # A batch job's side input is the same for every bundle: merge it once per DoFn instance.
        if self._prior is None:
            merged: Dict[str, List[Fingerprint]] = {}
            for partition in prior:
                for uri, fps in partition.items():
                    merged.setdefault(uri, []).extend(tuple(fp) for fp in fps)
            self._prior = merged
        return self._prior

    def process(self, refs, prior=()):
        refs = list(refs)
        known = self._merged(prior) if self._skip else {}
        keep, records, skipped = [], [], 0
        for ref, fp in zip(refs, self._fingerprints(refs)):
            if fp is not None and any(_same(fp, p) for p in known.get(ref.uri, ())):
                skipped += 1
                continue
            keep.append(ref)
            if fp is not None:
                records.append({"uri": ref.uri, **fp})
        if skipped:
            self._skipped.inc(skipped)
            yield beam.pvalue.TaggedOutput(SKIPPED, skipped)
        if records:
            yield beam.pvalue.TaggedOutput(FINGERPRINTS, records)
        if keep:
            yield keep

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class _ListCommitted(beam.DoFn):
    """ROOT -> ``(partition, _SUCCESS document)`` for every committed partition under it."""

    def __init__(self, exclude: str):
        self._exclude = exclude.rstrip("/")

    def process(self, root: str):
        root = root.rstrip("/")
        seen = set()
        for result in FileSystems.match([f"{root}/{SUCCESS}", f"{root}/**/{SUCCESS}"]):
            for metadata in result.metadata_list:
                partition = metadata.path[: -len(SUCCESS) - 1]
                if partition.rstrip("/") == self._exclude or partition in seen:
                    continue  # this run replaces that partition: score everything in it again
                seen.add(partition)
                with FileSystems.open(metadata.path) as f:
                    done = json.loads(f.read().decode("utf-8"))
                if done.get("unaccounted", 0):
                    continue  # a run that lost track of inputs: trust none of its records
                yield partition, done


def _read_jsonl(path: str):
    with FileSystems.open(path) as f:
        for line in f.read().decode("utf-8").splitlines():
            if line.strip():
                yield json.loads(line)


class _ReadPartition(beam.DoFn):
    """``(partition, _SUCCESS)`` -> ``{uri: [[size, mtime], ...]}`` of the inputs it scored."""

    def process(self, element):
        partition, done = element
        files = done.get("files", {})
        unsettled = {row["uri"] for name in files.get("dead_letter", [])
                     for row in _read_jsonl(FileSystems.join(partition, name))
                     if row.get("stage") not in SETTLED_DEAD_LETTER_STAGES}
        scored: Dict[str, List[List[float]]] = {}
        for name in files.get("scored", []):
            for row in _read_jsonl(FileSystems.join(partition, name)):
                if row["uri"] not in unsettled:
                    scored.setdefault(row["uri"], []).append([row["size"], row["mtime"]])
        yield scored


class CheckScored(beam.PTransform):
    """Lists of ImageRefs -> ``{"refs": lists to score, "fingerprints": blocks of records,
    "skipped": counts}``.

    Args:
        skip_root: ``--skip_scored ROOT``, or None to score everything.
        output: This run's partition, never counted as scored (a rerun replaces it).
    """

    def __init__(self, skip_root: Optional[str], output: str):
        super().__init__()
        self._root, self._output = skip_root, output

    def expand(self, batches):
        side = {}
        if self._root:
            prior = (batches.pipeline | "ScoredRoot" >> beam.Create([self._root])
                     | "ListCommitted" >> beam.ParDo(_ListCommitted(self._output))
                     | "SpreadPartitions" >> beam.Reshuffle()
                     | "ReadScored" >> beam.ParDo(_ReadPartition()))
            side = {"prior": beam.pvalue.AsList(prior)}
        checked = batches | "Fingerprint" >> beam.ParDo(_CheckBatch(bool(self._root)), **side).with_outputs(
            FINGERPRINTS, SKIPPED, main="refs")
        return {"refs": checked.refs, FINGERPRINTS: checked[FINGERPRINTS], SKIPPED: checked[SKIPPED]}
