"""What a run scored, and ``--skip_scored``: skip inputs a committed run already scored (issue 11).

Every input that exists gets a fingerprint when it is listed: its size and modification time
(on GCS, the object's ``updated`` time, which every new generation changes). A committed
partition records, in ``_scored-*.jsonl``, ``{"uri", "size", "mtime"}`` for each input whose
outcome depends only on its bytes: a prediction, or a dead letter from decoding (a corrupt or
unsupported file stays so until it changes). Inputs that could not be read or whose batch failed
in inference are not recorded, so the next run tries them again.

With ``--skip_scored ROOT``, inputs whose URI and fingerprint appear in a committed partition
under ROOT (one with ``_SUCCESS``; the partition this run replaces does not count) are skipped and
counted; a changed file has a new fingerprint and is scored again.
"""

from __future__ import annotations

import json
from typing import Dict, Iterable, Optional

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


def fingerprint(uri: str) -> Optional[Dict[str, float]]:
    """``{"size", "mtime"}`` of the file at ``uri``, or None when it cannot be stat'ed (it then
    becomes a read dead letter downstream, and is not recorded as scored)."""
    if any(c in uri for c in "*?["):
        return None  # Beam would read it as a glob
    try:
        found = FileSystems.match([uri])[0].metadata_list
    except Exception:  # a missing or unreadable file: the reader reports it with the reason
        return None
    if len(found) != 1:
        return None
    return {"size": int(found[0].size_in_bytes), "mtime": round(float(found[0].last_updated_in_seconds), 3)}


def _same(a: Dict, b: Dict) -> bool:
    return a["size"] == b["size"] and abs(a["mtime"] - b["mtime"]) < 1e-3


class _CheckInput(beam.DoFn):
    """``(uri, {"refs": [...], "prior": [...]})`` or a ref -> ref to score | skipped | fingerprint."""

    def setup(self):
        self._skipped = Metrics.counter(NAMESPACE, "skipped")

    def _check(self, ref, prior: Iterable[Dict]):
        fp = fingerprint(ref.uri)
        if fp is not None and any(_same(fp, p) for p in prior):
            self._skipped.inc()
            yield beam.pvalue.TaggedOutput(SKIPPED, ref)
            return
        if fp is not None:
            yield beam.pvalue.TaggedOutput(FINGERPRINTS, (ref.uri, fp))
        yield ref

    def process(self, element):
        if hasattr(element, "uri"):  # an ImageRef (itself a tuple): no --skip_scored
            yield from self._check(element, ())
            return
        _, grouped = element
        prior = list(grouped["prior"])
        for ref in grouped["refs"]:
            yield from self._check(ref, prior)


class _ListCommittedScored(beam.DoFn):
    """ROOT -> the ``_scored-*`` files listed by every committed ``_SUCCESS`` under it."""

    def __init__(self, exclude: str):
        self._exclude = exclude.rstrip("/")

    def process(self, root: str):
        root = root.rstrip("/")
        patterns = [f"{root}/{SUCCESS}", f"{root}/**/{SUCCESS}"]
        for result in FileSystems.match(patterns):
            for metadata in result.metadata_list:
                partition = metadata.path[: -len(SUCCESS) - 1]
                if partition.rstrip("/") == self._exclude:
                    continue  # this run replaces that partition: score everything in it again
                with FileSystems.open(metadata.path) as f:
                    done = json.loads(f.read().decode("utf-8"))
                for name in done.get("files", {}).get("scored", []):
                    yield FileSystems.join(partition, name)


class _ReadScored(beam.DoFn):
    def process(self, path: str):
        with FileSystems.open(path) as f:
            for line in f.read().decode("utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    yield row["uri"], {"size": row["size"], "mtime": row["mtime"]}


class CheckScored(beam.PTransform):
    """ImageRefs -> ``{"refs": to score, "fingerprints": (uri, fp), "skipped": refs skipped}``.

    Args:
        skip_root: ``--skip_scored ROOT``, or None to score everything.
        output: This run's partition, never counted as scored (a rerun replaces it).
    """

    def __init__(self, skip_root: Optional[str], output: str):
        super().__init__()
        self._root, self._output = skip_root, output

    def expand(self, refs):
        if self._root:
            prior = (refs.pipeline | "ScoredRoot" >> beam.Create([self._root])
                     | "ListCommitted" >> beam.ParDo(_ListCommittedScored(self._output))
                     | "SpreadScoredFiles" >> beam.Reshuffle()
                     | "ReadScored" >> beam.ParDo(_ReadScored()))
            keyed = refs | "KeyByUri" >> beam.Map(lambda ref: (ref.uri, ref))
            refs = {"refs": keyed, "prior": prior} | "JoinScored" >> beam.CoGroupByKey()
        checked = refs | "Fingerprint" >> beam.ParDo(_CheckInput()).with_outputs(FINGERPRINTS, SKIPPED, main="refs")
        return {"refs": checked.refs, FINGERPRINTS: checked[FINGERPRINTS], SKIPPED: checked[SKIPPED]}


def _settled(element):
    uri, grouped = element
    if list(grouped["pred"]) or any(stage in SETTLED_DEAD_LETTER_STAGES for stage in grouped["dead"]):
        seen = []
        for fp in grouped["fp"]:
            if not any(_same(fp, s) for s in seen):
                seen.append(fp)
                yield {"uri": uri, **fp}


class ScoredRecords(beam.PTransform):
    """``{"fingerprints", "predictions", "dead_letters"}`` -> ``{"uri", "size", "mtime"}`` per input
    this run settled (see the module docstring)."""

    def expand(self, pcolls):
        return ({"fp": pcolls[FINGERPRINTS],
                 "pred": pcolls["predictions"] | "PredUri" >> beam.Map(lambda row: (row["uri"], 1)),
                 "dead": pcolls["dead_letters"] | "DeadUri" >> beam.Map(lambda row: (row["uri"], row["stage"]))}
                | "JoinOutcomes" >> beam.CoGroupByKey()
                | "Settled" >> beam.FlatMap(_settled))
