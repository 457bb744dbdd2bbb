"""What a run scored, and ``--skip_scored``: skip inputs a committed run already scored (docs/scheduling.md).

Every input that exists gets a fingerprint when its batch is checked, before it is read: its size
and modification time (on GCS, the object's ``updated`` time, which every new generation changes).
A committed partition records, in ``_scored-*.jsonl``, ``{"uri", "size", "mtime"}`` for each
input it fingerprinted. An input counts as scored by that partition when its outcome depends only
on its bytes: a prediction, or a dead letter from decoding (a corrupt or unsupported file stays so
until it changes). Inputs with a ``read``, ``inference`` or ``manifest`` dead letter in the same
partition do not count, so the next run tries them again; that rule is applied when a later run
reads the records (:class:`_ReadPartition`), because deciding it while writing would need a join
of every input with its outcome, one Beam element per image, whose per-element cost the pipeline's
batches exist to avoid (benchmarks/NOTES.md).

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
import logging
import os
import stat
from typing import Dict, List, Optional, Sequence, Set, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from engines import storage
from transforms.timing import NAMESPACE

_LOG = logging.getLogger(__name__)

FINGERPRINTS = "fingerprints"
SKIPPED = "skipped"
SCORED_PREFIX = "_scored"
SUCCESS = "_SUCCESS"
#: Dead-letter stages whose outcome depends only on the file's bytes (recorded as scored).
SETTLED_DEAD_LETTER_STAGES = ("decode",)
#: Threads that fetch remote objects' metadata for one batch (a GCS metadata request takes tens
#: of milliseconds; a batch of 256 in series would take seconds).
REMOTE_STAT_THREADS = 16

#: What a committed partition's ``model`` record must share with this run's for its inputs to count as
#: scored: the same model (file name and sha256, or ``--model_version``) making the same rows (output mode,
#: outputs, activation, threshold) from the same input conversion. Another model's rows, or classes where
#: this run writes embeddings, are not this run's results.
SCORING_KEYS = ("identity", "output_mode", "activation", "threshold")


def scoring_of(model: Optional[Dict]) -> Optional[str]:
    """What made a partition's rows, from its ``_SUCCESS`` ``model`` record, as one comparable string;
    None for a record without one (written before records named their model)."""
    if not model:
        return None
    pre = model.get("preprocessing") or {}
    return json.dumps([[model.get(k) for k in SCORING_KEYS], [o.get("name") for o in model.get("outputs") or ()],
                       [pre.get("mean"), pre.get("std"), pre.get("channel_order")]])


#: ``(size in bytes, modification time in whole milliseconds)``: hashable, so a URI's earlier
#: fingerprints are a set and each check costs O(1), however often a URI was recorded.
Fingerprint = Tuple[int, int]


def fingerprint(uri: str) -> Optional[Dict[str, float]]:
    """``{"size", "mtime"}`` of the file at ``uri``, or None when it cannot be stat'ed (it then
    becomes a read dead letter downstream, and is not recorded as scored)."""
    try:
        if not storage.is_url(uri):
            return _fields(os.stat(uri))  # follows symlinks, as reading does
        metadata = FileSystems.get_filesystem(uri).metadata(uri)
        size, mtime = metadata.size_in_bytes, metadata.last_updated_in_seconds
    except Exception:  # a missing or unreadable file: the reader reports it with the reason
        return None
    return {"size": int(size), "mtime": round(float(mtime), 3)}


def _fields(st: os.stat_result) -> Optional[Dict[str, float]]:
    if not stat.S_ISREG(st.st_mode):
        return None  # a FIFO or device: the reader refuses it with the reason
    return {"size": int(st.st_size), "mtime": round(float(st.st_mtime), 3)}


def local_fingerprint(path: str) -> Tuple[Optional[Dict[str, float]], Optional[bool]]:
    """:func:`fingerprint` of a local file and whether its absolute spelling is a symbolic link (what
    ``storage.canonical_files`` asks), from one ``lstat`` for a file that is not a link.

    Each system call lets go of the GIL and must win it back, which beside busy threads costs far more than the
    call: ``os.stat`` then ``os.path.islink`` was 31% of a bundle thread's time on an H100 host (benchmarks/NOTES.md).
    A path with a ``..`` part is stat'ed as given (``..`` after a linked folder is not ``os.path.abspath``'s
    ``..``), its link left for ``canonical_files`` to check (None).
    """
    if ".." in path.split(os.sep):
        return fingerprint(path), None
    try:
        st = os.lstat(path)
        link = stat.S_ISLNK(st.st_mode)
        if link:
            st = os.stat(path)  # follows the link, as reading does
    except Exception:  # a missing or unreadable file, a dangling link: the reader reports it with the reason
        return None, None
    return _fields(st), link


def _key(fp: Dict[str, float]) -> Fingerprint:
    return int(fp["size"]), int(round(float(fp["mtime"]) * 1000))


def record_uri(uri: str) -> str:
    """The URI as records store and compare it: one spelling per file (``storage.canonical``)."""
    try:
        return storage.canonical(uri)
    except (OSError, ValueError):  # a NUL byte or an over-long name: keep it as given
        return uri


def record_uris(uris: Sequence[str], links: Optional[Sequence[Optional[bool]]] = None) -> List[str]:
    """:func:`record_uri` of each, a folder resolved once for all its files (``storage.canonical_files``,
    which takes ``links`` where known)."""
    try:
        return storage.canonical_files(uris, links)
    except (OSError, ValueError):  # one bad name: each on its own, that one kept as given
        return [record_uri(uri) for uri in uris]


def _spelled(uris: Sequence[str], fps: Sequence[Optional[Dict[str, float]]],
             links: Optional[Sequence[Optional[bool]]] = None) -> List[Tuple[Optional[Dict[str, float]], str]]:
    """``(fingerprint, the URI as records spell it)`` pairs; a URI without a fingerprint is kept as given."""
    found = [i for i, fp in enumerate(fps) if fp is not None]
    records = iter(record_uris([uris[i] for i in found], None if links is None else [links[i] for i in found]))
    return [(fp, next(records) if fp is not None else uri) for uri, fp in zip(uris, fps)]


def _checked_files(uris: Sequence[str]) -> List[Tuple[Optional[Dict[str, float]], str]]:
    """:func:`_spelled` of each local file and its :func:`local_fingerprint`, one after another on this thread."""
    checked = [local_fingerprint(uri) for uri in uris]
    return _spelled(uris, [fp for fp, _ in checked], [link for _, link in checked])


class _CheckBatch(beam.DoFn):
    """A list of refs -> the list to score (main), one block of fingerprint records
    (``fingerprints``) and the number skipped (``skipped``), each only when not empty. Each local regular
    file's ref carries the size its ``stat`` found (``ImageRef.size``), so the reader makes no second ``stat``.

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

    def _checked(self, uris: Sequence[str]) -> List[Tuple[Optional[Dict[str, float]], str]]:
        """``(fingerprint or None, the URI as records spell it)`` of each: local files on this thread, a batch
        holding a remote URI on the DoFn's pool (a request each, tens of milliseconds apiece)."""
        if not any(storage.is_url(uri) for uri in uris):
            return _checked_files(uris)
        if self._pool is None:
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(REMOTE_STAT_THREADS, thread_name_prefix="stat")
        return _spelled(uris, list(self._pool.map(fingerprint, uris)))

    def _merged(self, prior) -> Dict[str, Set[Fingerprint]]:
        # A batch job's side input is the same for every bundle: merge it once per DoFn instance.
        if self._prior is None:
            merged: Dict[str, Set[Fingerprint]] = {}
            for partition in prior:
                for uri, fps in partition.items():
                    merged.setdefault(uri, set()).update(tuple(fp) for fp in fps)
            self._prior = merged
        return self._prior

    def process(self, refs, prior=()):
        refs = list(refs)
        known = self._merged(prior) if self._skip else {}
        keep, records, skipped = [], [], 0
        for ref, (fp, uri) in zip(refs, self._checked([ref.uri for ref in refs])):
            if fp is not None and _key(fp) in known.get(uri, ()):
                skipped += 1
                continue
            if fp is not None:
                records.append({"uri": uri, **fp})
                if not storage.is_url(ref.uri):  # a regular local file: the reader need not stat it again
                    ref = ref._replace(size=int(fp["size"]))
            keep.append(ref)
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
    """ROOT -> ``(partition, _SUCCESS record)`` for every committed partition under it.

    Skipped: the partition this run replaces (by canonical path, or by the run id it holds now),
    partitions that lost track of inputs, partitions another model or row layout made (:func:`scoring_of`
    differs), and ``_SUCCESS`` files that are not a readable record of this pipeline (truncated, empty,
    another tool's), each with a warning naming the file.

    Args:
        exclude: This run's ``--output`` (canonical).
        replaces: The run id committed there when this run was launched, or None.
        scoring: This run's :func:`scoring_of`, or None to count partitions whatever made them.
    """

    def __init__(self, exclude: str, replaces: Optional[str] = None, scoring: Optional[str] = None):
        self._exclude = storage.canonical(exclude)
        self._replaces = replaces
        self._scoring = scoring

    def process(self, root: str):
        from transforms.commit import parse_record

        for path in sorted(storage.list_tree(root)):
            if path.rsplit("/", 1)[-1] != SUCCESS:
                continue
            partition = path[: -len(SUCCESS) - 1]
            if storage.canonical(partition) == self._exclude:
                continue  # this run replaces that partition: score everything in it again
            try:
                record = parse_record(storage.read_versioned(path)[1])
            except Exception as e:  # unreadable (permissions, a folder named _SUCCESS): not a record
                record, why = None, str(e)
            else:
                why = "truncated, empty or not written by this pipeline"
            if record is None:
                _LOG.warning("--skip_scored: skipping %s (%s); the inputs of that partition are scored again. Fix: "
                             "rerun that day to rewrite it, or delete the file if the folder is not a partition",
                             path, why)
                continue
            if record["run_id"] == self._replaces or record.get("unaccounted", 0):
                continue  # the same partition under another spelling, or a run that lost track of inputs
            if self._scoring is not None and scoring_of(record.get("model")) != self._scoring:
                made = (record.get("model") or {}).get("identity")
                _LOG.warning("--skip_scored: not skipping the inputs of %s: %s made its rows, not this run's model "
                             "and output settings; they are scored again", partition,
                             made or "a run that did not record its model")
                continue
            yield partition, record


def _read_jsonl(path: str):
    for line in storage.read(path).decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


class _ReadPartition(beam.DoFn):
    """``(partition, _SUCCESS)`` -> ``{uri: [[size, mtime_ms], ...]}`` of the inputs it scored.

    A damaged file never stops the run: an unreadable dead-letter file drops the whole partition
    (which of its inputs may be skipped is then unknown), an unreadable ``_scored`` file drops the
    inputs it recorded; either is logged with the file and the fix, and those inputs are scored again.
    """

    def process(self, element):
        partition, done = element
        files = done.get("files", {})
        try:
            unsettled = {record_uri(row["uri"]) for name in files.get("dead_letter", [])
                         for row in _read_jsonl(storage.join(partition, *name.split("/")))
                         if row.get("stage") not in SETTLED_DEAD_LETTER_STAGES}
        except Exception as e:  # missing, truncated, not JSON, rows without "uri"
            _LOG.warning("--skip_scored: skipping %s: a dead-letter file it lists cannot be read (%s); its inputs are "
                         "scored again. Fix: rerun that day to rewrite the partition", partition, e)
            return
        scored: Dict[str, Set[Fingerprint]] = {}
        for name in files.get("scored", []):
            path = storage.join(partition, *name.split("/"))
            try:
                rows = [(row["uri"], _key(row)) for row in _read_jsonl(path)]
            except Exception as e:
                _LOG.warning("--skip_scored: skipping %s (%s); the inputs it recorded are scored again. Fix: rerun "
                             "that day to rewrite the partition", path, e)
                continue
            for uri, key in rows:
                if uri not in unsettled:
                    scored.setdefault(uri, set()).add(key)
        yield {uri: sorted(keys) for uri, keys in scored.items()}


class CheckScored(beam.PTransform):
    """Lists of ImageRefs -> ``{"refs": lists to score, "fingerprints": blocks of records,
    "skipped": counts}``.

    Args:
        skip_root: ``--skip_scored ROOT``, or None to score everything.
        output: This run's partition, never counted as scored (a rerun replaces it).
        replaces: The run id committed in ``output`` at launch; a partition holding it is the
            same folder under another name and is not counted either. Default None.
        model: This run's model record (``_SUCCESS``'s ``model``): only partitions the same model and
            row settings made count (:func:`scoring_of`). Default None: any partition counts.
    """

    def __init__(self, skip_root: Optional[str], output: str, replaces: Optional[str] = None,
                 model: Optional[Dict] = None):
        super().__init__()
        self._root, self._output, self._replaces = skip_root, output, replaces
        self._scoring = scoring_of(model) if model else None

    def expand(self, batches):
        side = {}
        if self._root:
            prior = (batches.pipeline | "ScoredRoot" >> beam.Create([self._root])
                     | "ListCommitted" >> beam.ParDo(_ListCommitted(self._output, self._replaces, self._scoring))
                     | "SpreadPartitions" >> beam.Reshuffle()
                     | "ReadScored" >> beam.ParDo(_ReadPartition()))
            side = {"prior": beam.pvalue.AsList(prior)}
        checked = batches | "Fingerprint" >> beam.ParDo(_CheckBatch(bool(self._root)), **side).with_outputs(
            FINGERPRINTS, SKIPPED, main="refs")
        return {"refs": checked.refs, FINGERPRINTS: checked[FINGERPRINTS], SKIPPED: checked[SKIPPED]}
