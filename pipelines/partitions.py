"""Date partitions for scheduled runs: ``--run_date``, ``{date}`` placeholders, run ids (docs/scheduling.md).

A scheduler passes one parameter, the date; ``--input 'gs://b/photos/dt={date}/**'`` and
``--output 'gs://b/scored/dt={date}'`` become that day's folders. Everything here runs in the
launcher, before the pipeline is built, so a bad date or an unknown placeholder stops the job at
start with an error naming the flag.
"""

from __future__ import annotations

import datetime as dt
import json
import string
import uuid
from typing import Any, Dict, List, Optional

from engines.base import EngineError, UsageError

#: Placeholders ``--input`` and ``--output`` may hold, and what fills them.
PLACEHOLDERS = ("date",)
#: ``--run_date`` words resolved in UTC when the job starts: a Cloud Scheduler body is fixed text,
#: so a nightly job for the day that just ended passes ``yesterday`` (docs/scheduling.md).
DATE_WORDS = ("today", "yesterday")
RUN_DATE_PATTERN = r"^(\d{4}-\d{2}-\d{2}|today|yesterday)$"


def parse_run_date(value: Optional[str], now: Optional[dt.datetime] = None) -> dt.date:
    """The run's date from ``--run_date``.

    Args:
        value: ``YYYY-MM-DD``, ``today`` or ``yesterday`` (UTC); None or "" means today (UTC).
        now: The current time, for tests. Default: now, UTC.

    Raises:
        UsageError: naming ``--run_date`` and the form it takes.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    text = (value or "today").strip()
    if text in DATE_WORDS:
        return now.date() - dt.timedelta(days=DATE_WORDS.index(text))
    try:
        if len(text) != 10:
            raise ValueError("not 10 characters")
        return dt.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--run_date {value!r} is not a date: use YYYY-MM-DD (e.g. 2024-05-31), 'today' or "
                         f"'yesterday' (UTC); the default is today (UTC)") from None


def fill_placeholders(flag: str, value: str, run_date: dt.date) -> str:
    """``value`` with ``{date}`` replaced by ``run_date`` (``YYYY-MM-DD``).

    ``{{`` and ``}}`` stand for literal braces.

    Raises:
        UsageError: an unknown placeholder or an unmatched brace, naming ``flag``.
    """
    try:
        fields = [name for _, name, spec, conv in string.Formatter().parse(value) if name is not None]
        unknown = [name for name in fields if name not in PLACEHOLDERS]
        if unknown:
            raise UsageError(f"{flag} {value!r} has the unknown placeholder {{{unknown[0]}}}; the only placeholder "
                             f"is {{date}} (filled from --run_date); write {{{{ and }}}} for literal braces")
        return value.format(date=run_date.isoformat())
    except (ValueError, IndexError, KeyError) as e:
        raise UsageError(f"{flag} {value!r} is not a valid template ({e}); the only placeholder is {{date}}, "
                         f"write {{{{ and }}}} for literal braces") from None


def new_run_id(now: Optional[dt.datetime] = None) -> str:
    """A run id that sorts by start time and never repeats: ``20240531T010203.123456Z-1a2b3c4d``.

    Microseconds, not whole seconds: the commit removes the staging folders of runs whose id sorts
    at or before its own, and a killed run and its rerun can start within one second; the random
    suffix then decided their order, and half the time the dead run's staging stayed behind.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex[:8]}"


def dated_flags(opts) -> Dict[str, str]:
    """``--input`` and ``--output`` with ``{date}`` filled from ``--run_date``, and the run date itself.

    Nothing is written into ``opts``: ``pipelines.settings.resolve`` builds the job's options with these.

    Returns:
        Option name -> value: ``run_date`` (``YYYY-MM-DD``), and ``input`` and ``output`` where given.

    Raises:
        UsageError: a bad date or placeholder, naming the flag.
    """
    run_date = parse_run_date(opts.run_date)
    dated = {"run_date": run_date.isoformat()}
    if opts.input:
        dated["input"] = fill_placeholders("--input", opts.input, run_date)
    if opts.output:
        dated["output"] = fill_placeholders("--output", opts.output, run_date)
    return dated


def make_plan(settings):
    """The commit plan of this run: a new run id, and the version of ``--output``'s ``_SUCCESS`` it
    may replace (read now, at launch: a run that commits over another version fails).

    Args:
        settings: The run's ``pipelines.settings.RunSettings`` (its paths, and what stats.json says).
    """
    from engines import storage
    from pipelines.run_record import CommittedStatsWriter
    from transforms.commit import CommitPlan, parse_record

    start = dt.datetime.now(dt.timezone.utc)
    base, current = storage.read_versioned(storage.join(settings.output, "_SUCCESS"))
    record = parse_record(current)
    return CommitPlan(output=settings.output, run_id=new_run_id(start), run_date=settings.run_date,
                      input=settings.input, start_time=start.isoformat(timespec="seconds"),
                      skip_root=settings.skip_scored or None,
                      write_stats=CommittedStatsWriter(settings.engine_record(), settings.record()), base=base,
                      replaces=record["run_id"] if record else None, model=settings.model.record())


def write_and_commit(plan, found, checked, predictions, dead, output_format: str, bigquery=None, rows=None):
    """Writes predictions, dead letters and the scored-input records into the run's own folder, then
    commits the partition as the pipeline's last step (transforms/commit.py).

    Args:
        plan: The run's ``transforms.commit.CommitPlan``.
        found: ``ImageRefs``'s outputs: lists of refs, and dead-letter rows from listing.
        checked: ``CheckScored``'s outputs: fingerprint blocks and skipped counts.
        predictions: Blocks (lists) of prediction rows.
        dead: Dead-letter rows, one element each.
        output_format: ``--output_format``.
        bigquery: A checked ``transforms.bigquery.BigQueryTarget`` to load the predictions into as
            well, before the commit, which records it under ``bigquery``; None: files only.
        rows: What each prediction row holds (``transforms.postprocess.RowLayout``): the Parquet and
            BigQuery schemas follow it. Default: the top-k layout.

    Returns:
        The commit step's output: the ``_SUCCESS`` document.
    """
    import apache_beam as beam

    from transforms.commit import CommitPartition
    from transforms.images import DEAD_LETTER
    from transforms.scored import FINGERPRINTS, SCORED_PREFIX, SKIPPED
    from transforms.sinks import WriteRows

    written = [predictions | "WritePredictions" >> WriteRows(plan.run_folder, "predictions", output_format,
                                                             blocks=True, rows=rows),
               dead | "WriteDeadLetters" >> WriteRows(plan.run_folder, "dead_letter", "jsonl"),
               checked[FINGERPRINTS] | "WriteScored" >> WriteRows(plan.run_folder, SCORED_PREFIX, "jsonl", blocks=True)]
    # Counts per batch or block (one number per element), never one element per image: Beam's
    # per-element cost is what the batches keep off the images. Dead letters are one element each
    # already and count 1 each; CommitPartition sums every count in one grouping.
    inputs = ((found["refs"] | "InputsPerBatch" >> beam.Map(len),
               found[DEAD_LETTER] | "UnlistedInputs" >> beam.Map(lambda _: 1))
              | "AllInputs" >> beam.Flatten())
    commit = {"written": written | "AllWritten" >> beam.Flatten(), "inputs": inputs,
              "predictions": predictions | "RowsPerBlock" >> beam.Map(len),
              "dead_letters": dead | "CountDead" >> beam.Map(lambda _: 1),
              "skipped": checked[SKIPPED]}
    if bigquery is not None:
        from transforms.bigquery import WritePredictionsToBigQuery, table_schema
        from transforms.sinks import prediction_schema

        commit["sinks"] = predictions | "WriteBigQuery" >> WritePredictionsToBigQuery(
            bigquery, plan.run_id, table_schema(prediction_schema(rows)))
    return commit | "CommitPartition" >> CommitPartition(plan)


def concurrent_commit(plan):
    """The :class:`transforms.commit.CommitConflict` to raise when another run committed ``plan``'s
    partition after this run was launched, or None (nothing changed, or this run committed it).

    A run that loses the race can fail before its commit step (the winner's commit removes the
    folders of runs that sort before it, this one's among them); this names the real cause.
    """
    from engines import storage
    from transforms.commit import CommitConflict, parse_record

    try:
        token, data = storage.read_versioned(plan.success)
    except Exception:  # the storage itself failing: let the original error speak
        return None
    record = parse_record(data)
    if token == plan.base or (record is not None and record["run_id"] == plan.run_id):
        return None
    return CommitConflict(plan, (record or {}) if data is not None else None)


def is_partition(output: str) -> bool:
    """True when ``output`` is a partition this pipeline committed, or began to commit.

    Its ``_SUCCESS`` is this pipeline's JSON document (a run id), or run folders or ``_scored-*``
    files (an older version's commit that stopped midway) are there. A rerun may replace such a
    partition; ``check_output`` refuses other folders holding results.
    """
    from engines import storage
    from transforms.commit import RUN_PREFIX, parse_record
    from transforms.scored import SCORED_PREFIX, SUCCESS

    try:
        if parse_record(storage.read_versioned(storage.join(output, SUCCESS))[1]) is not None:
            return True
        return any(name.startswith((SCORED_PREFIX + "-", RUN_PREFIX)) for name in storage.list_children(output))
    except (OSError, EngineError):  # unreadable: not known to be ours
        return False


def read_committed(output: str) -> Dict[str, Any]:
    """The ``_SUCCESS`` record of the partition at ``output``.

    Raises:
        EngineError: the partition has no readable record of this pipeline.
    """
    from engines import storage
    from transforms.commit import parse_record

    path = storage.join(output, "_SUCCESS")
    _, data = storage.read_versioned(path)
    record = parse_record(data)
    if record is None:
        what = "has no _SUCCESS" if data is None else "has a _SUCCESS that is not a record of this pipeline"
        raise EngineError(f"{output} {what}: no run of this pipeline has committed it")
    return record


def committed_files(output: str, kind: str, record: Optional[Dict[str, Any]] = None) -> List[str]:
    """The paths of one kind of file in the committed partition at ``output``: what to read.

    Args:
        output: The partition.
        kind: ``predictions``, ``dead_letter``, ``scored`` or ``stats``.
        record: Its ``_SUCCESS`` record when already read. Default: read it now.
    """
    from engines import storage

    record = record or read_committed(output)
    return [storage.join(output, *name.split("/")) for name in record["files"].get(kind, [])]


def committed_rows(output: str, kind: str = "predictions", missing_ok: bool = False) -> List[Dict[str, Any]]:
    """The JSON Lines rows of one kind of file in the committed local partition at ``output``.

    Args:
        missing_ok: Return no rows, rather than raise, when nothing is committed there. Default False.
    """
    from engines import storage

    if missing_ok and not storage.exists(storage.join(output, "_SUCCESS")):
        return []
    rows: List[Dict[str, Any]] = []
    for path in committed_files(output, kind):
        with open(path, encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def committed_stats(output: str) -> Dict[str, Any]:
    """The ``stats.json`` of the run committed at the local partition ``output``."""
    (path,) = [p for p in committed_files(output, "stats") if p.endswith(".json")]
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_rows(pattern: str) -> List[Dict[str, Any]]:
    """The JSON Lines rows of every local file matching ``pattern``, file by file in name order."""
    import glob

    rows: List[Dict[str, Any]] = []
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows
