"""Prediction rows into a BigQuery table, one date partition per run (``--output_table``).

The table is a second sink beside the files in ``--output`` (which are still written and committed):
Beam's own ``WriteToBigQuery`` loads the run's prediction rows into the day ``TABLE$YYYYMMDD`` of
``--run_date`` with ``WRITE_TRUNCATE``, so a rerun of a day replaces that day and never doubles it
(https://cloud.google.com/bigquery/docs/managing-partitioned-table-data, "Write data to a specific
partition"). The table is partitioned by day on its DATE column ``run_date``.

Method: batch file loads (``FILE_LOADS``), Google's recommendation for batch jobs
(https://cloud.google.com/bigquery/docs/batch-loading-data): Beam writes the rows as JSON files under
``--temp_location`` (which must be ``gs://``) and runs one load job per destination; a load job is
atomic, so the day holds the previous run's rows or this run's, never a part. The other methods are
not offered: ``STREAMING_INSERTS`` append row by row and cannot replace a partition (a rerun would
double the day), and ``STORAGE_WRITE_API`` is Beam's Java transform behind a cross-language
expansion service (a Java runtime and a jar fetched at launch) and appends as well. docs/bigquery.md.

Every check that can fail runs at start, before the pipeline is built (:func:`check_table`):
credentials, the dataset, the table (created when missing, partitioned as above), its schema against
the rows' (both shown when they differ) and its partitioning.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from typing import Any, Dict, Iterable, List, Mapping, Optional

import apache_beam as beam

from engines.base import UsageError

_LOG = logging.getLogger(__name__)

#: The DATE column the table is partitioned on, by day; every row carries the run's date.
PARTITION_COLUMN = "run_date"
#: The only write method offered (see the module docstring for the others).
METHOD = "FILE_LOADS"
#: What ``gcloud`` command gives this machine the credentials Beam's BigQuery client looks for.
LOGIN = "gcloud auth application-default login"
#: Columns every BigQuery row carries beside the prediction row's: the model identity and the run.
RUN_COLUMNS = (
    {"name": "engine", "type": "STRING", "mode": "REQUIRED"},
    {"name": "model", "type": "STRING", "mode": "REQUIRED"},
    {"name": "run_id", "type": "STRING", "mode": "REQUIRED"},
    {"name": PARTITION_COLUMN, "type": "DATE", "mode": "REQUIRED"},
)


def add_flags(parser) -> None:
    """Adds ``--output_table`` to a ``PipelineOptions`` parser."""
    parser.add_argument("--output_table", default=None, metavar="PROJECT:DATASET.TABLE",
                        help="Also load the prediction rows into this BigQuery table (created when missing, "
                             "partitioned by day on run_date); each run replaces its --run_date's partition. "
                             "Needs --temp_location gs://... and Google credentials. Default: files only.")


@dataclasses.dataclass(frozen=True)
class BigQueryTarget:
    """Where a run's prediction rows go, and the model identity every row carries.

    Args:
        project: The table's project.
        dataset: Its dataset (must exist).
        table: The table, without a partition decorator.
        run_date: ``YYYY-MM-DD``: the partition this run replaces.
        engine: ``--engine`` (``onnxruntime`` or ``tensorrt``).
        model: The model file the engine was built from or loaded (path or URI).
    """

    project: str
    dataset: str
    table: str
    run_date: str
    engine: str
    model: str

    def __post_init__(self):
        for name in ("project", "dataset", "table", "engine", "model"):
            if not getattr(self, name):
                raise UsageError(f"BigQuery target: {name} is empty")
        if any(c in self.table for c in "$@"):
            raise UsageError(f"--output_table {self.spec}: leave out the partition or snapshot decorator; each run "
                             f"writes its own day's partition ({self.table.split('$')[0].split('@')[0]}$YYYYMMDD, "
                             f"from --run_date)")
        try:
            dt.date.fromisoformat(self.run_date)
        except (TypeError, ValueError):
            raise UsageError(f"BigQuery target: run_date {self.run_date!r} is not YYYY-MM-DD") from None

    @property
    def spec(self) -> str:
        """``PROJECT:DATASET.TABLE``."""
        return f"{self.project}:{self.dataset}.{self.table}"

    @property
    def partition(self) -> str:
        """``TABLE$YYYYMMDD``: the day this run replaces."""
        return f"{self.table}${self.run_date.replace('-', '')}"

    def describe(self) -> Dict[str, Any]:
        """The ``bigquery`` entry of ``_SUCCESS`` and stats.json, less what the run counts."""
        return {"table": self.spec, "partition": self.partition, "partition_column": PARTITION_COLUMN,
                "method": METHOD, "write_disposition": "WRITE_TRUNCATE",
                "dead_letters": "in files only: the dead_letter files _SUCCESS lists"}


def resolve_target(spec: Optional[str], run_date: str, options, engine: str, model: str) -> Optional[BigQueryTarget]:
    """The run's BigQuery target from ``--output_table``, or None when it is not set.

    Args:
        spec: ``--output_table``: ``PROJECT:DATASET.TABLE``, ``PROJECT.DATASET.TABLE`` or ``DATASET.TABLE``
            (with ``--project``).
        run_date: ``--run_date``, resolved to ``YYYY-MM-DD``.
        options: The job's ``PipelineOptions`` (``--project``, ``--temp_location``).
        engine: ``--engine``.
        model: The model's path or URI (the default model's when ``--model`` is not given).

    Raises:
        UsageError: a table spec Beam cannot parse, no project, or no ``gs://`` ``--temp_location``.
    """
    from apache_beam.io.gcp.bigquery_tools import parse_table_reference
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    if not spec:
        return None
    cloud = options.view_as(GoogleCloudOptions)
    try:
        ref = parse_table_reference(spec, project=cloud.project)
    except ValueError as e:
        raise UsageError(f"--output_table {spec}: {e}") from None
    project = ref.projectId or cloud.project
    if not project:
        raise UsageError(f"--output_table {spec} names no project: write PROJECT:DATASET.TABLE, or pass --project")
    temp = cloud.temp_location or ""
    if not temp.startswith("gs://"):
        raise UsageError(f"--output_table loads its rows from files in Cloud Storage (BigQuery file loads): pass "
                         f"--temp_location gs://BUCKET/tmp (got {temp or 'none'}), a bucket in the dataset's location")
    return BigQueryTarget(project=project, dataset=ref.datasetId, table=ref.tableId,
                          run_date=run_date, engine=engine, model=model)


def _bigquery_field(field) -> Dict[str, Any]:
    """One BigQuery schema field for one Arrow field of the prediction rows."""
    import pyarrow as pa

    kind, mode = field.type, "NULLABLE" if field.nullable else "REQUIRED"
    if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
        kind, mode = kind.value_type, "REPEATED"
        if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
            raise TypeError(f"column {field.name}: BigQuery has no list of lists")
    if pa.types.is_struct(kind):
        return {"name": field.name, "type": "RECORD", "mode": mode,
                "fields": [_bigquery_field(kind.field(i)) for i in range(kind.num_fields)]}
    for test, name in ((pa.types.is_string, "STRING"), (pa.types.is_integer, "INTEGER"),
                       (pa.types.is_floating, "FLOAT"), (pa.types.is_boolean, "BOOLEAN"),
                       (pa.types.is_date, "DATE"), (pa.types.is_timestamp, "TIMESTAMP")):
        if test(kind):
            return {"name": field.name, "type": name, "mode": mode}
    raise TypeError(f"column {field.name}: no BigQuery type for Arrow {kind}")


def table_schema(row_schema=None) -> Dict[str, Any]:
    """The table's schema: the prediction rows' columns, then :data:`RUN_COLUMNS`.

    The rows' columns come from the Parquet sink's Arrow schema (``transforms.sinks.prediction_schema``),
    the one description of a prediction row, so every column a row gains reaches the table the same way.

    Args:
        row_schema: An Arrow schema of prediction rows. Default: ``prediction_schema()``.

    Returns:
        ``{"fields": [...]}`` as BigQuery's REST API and ``WriteToBigQuery`` take it.
    """
    from transforms.sinks import prediction_schema

    row_schema = row_schema if row_schema is not None else prediction_schema()
    run = {c["name"] for c in RUN_COLUMNS}  # the rows' own "model" is the run's: one column
    return {"fields": [_bigquery_field(field) for field in row_schema if field.name not in run]
            + [dict(c) for c in RUN_COLUMNS]}


_TYPE_ALIASES = {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN", "STRUCT": "RECORD"}


def _normal(fields: Iterable[Mapping[str, Any]]) -> Dict[str, tuple]:
    """name -> (type, mode, nested), with BigQuery's type aliases and default mode folded."""
    return {f["name"].lower(): (_TYPE_ALIASES.get(str(f.get("type", "")).upper(), str(f.get("type", "")).upper()),
                                str(f.get("mode") or "NULLABLE").upper(), _normal(f.get("fields") or ()))
            for f in fields}


def show_schema(fields: Iterable[Mapping[str, Any]]) -> str:
    """``uri STRING, top_k RECORD REPEATED <class_id INTEGER, ...>``: a schema on one line."""
    parts = []
    for f in fields:
        text = f"{f['name']} {f.get('type')}"
        if str(f.get("mode") or "NULLABLE").upper() != "NULLABLE":
            text += f" {str(f['mode']).upper()}"
        if f.get("fields"):
            text += f" <{show_schema(f['fields'])}>"
        parts.append(text)
    return ", ".join(parts)


def schema_differences(wanted: Iterable[Mapping[str, Any]], found: Iterable[Mapping[str, Any]],
                       prefix: str = "") -> List[str]:
    """What differs between two schemas, by column name (order does not matter to a JSON load)."""
    wanted_n, found_n = _normal(wanted), _normal(found)
    wanted_f = {f["name"].lower(): f for f in wanted}
    found_f = {f["name"].lower(): f for f in found}
    problems = [f"{prefix}{wanted_f[n]['name']} is missing from the table" for n in wanted_n if n not in found_n]
    problems += [f"{prefix}{found_f[n]['name']} is in the table but not in the rows" for n in found_n
                 if n not in wanted_n]
    for name in wanted_n.keys() & found_n.keys():
        (wtype, wmode, _), (ftype, fmode, _) = wanted_n[name], found_n[name]
        label = prefix + wanted_f[name]["name"]
        if (wtype, wmode) != (ftype, fmode):
            problems.append(f"{label} is {ftype} {fmode} in the table, {wtype} {wmode} in the rows")
        elif wtype == "RECORD":
            problems += schema_differences(wanted_f[name].get("fields") or (), found_f[name].get("fields") or (),
                                           label + ".")
    return sorted(problems)


def check_credentials() -> None:
    """Fails at start when this machine has no Google credentials, or ones that no longer work.

    Without credentials Beam's BigQuery client (apitools) falls back to an interactive browser login and
    waits for it forever, which a scheduled job never gets; with expired ones every call fails after
    Beam's retries (about 30 s). One token request here says so at once.

    Raises:
        UsageError: naming the login to run.
    """
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError, GoogleAuthError
    from google.auth.transport.requests import Request

    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/bigquery"])
    except DefaultCredentialsError as e:
        raise UsageError(f"--output_table needs Google credentials and found none ({e}); run `{LOGIN}` (or set "
                         f"GOOGLE_APPLICATION_CREDENTIALS to a service account key file). On Dataflow the workers "
                         f"use the job's service account") from None
    try:
        credentials.refresh(Request())
    except GoogleAuthError as e:
        raise UsageError(f"--output_table: the Google credentials found here do not work ({e}); run `{LOGIN}` "
                         f"again") from None


def _http_status(error) -> Optional[int]:
    response = getattr(error, "response", None)
    try:
        return int(getattr(error, "status_code", None) or response.status)
    except (AttributeError, TypeError, ValueError):
        return None


def _partitioning(table) -> Optional[str]:
    part = getattr(table, "timePartitioning", None)
    if part is None:
        return None
    return f"{part.type or 'DAY'} on {part.field or '_PARTITIONTIME (ingestion time)'}"


def check_table(target: BigQueryTarget, options, schema: Optional[Dict[str, Any]] = None) -> str:
    """Checks, at start, that the run can replace its day in ``target``'s table; creates a missing table.

    Goes through Beam's own BigQuery client (``BigQueryWrapper``), so ``--bigquery_endpoint`` and the
    credentials Beam finds apply as they do for the job.

    Args:
        target: From :func:`resolve_target`.
        options: The job's ``PipelineOptions``.
        schema: The rows' schema. Default: :func:`table_schema`.

    Returns:
        What was done, for the log: "exists" or "created".

    Raises:
        UsageError: no credentials (naming the login), a missing dataset (naming ``bq mk``), a table whose
            schema differs from the rows' (both shown) or that is not partitioned by day on ``run_date``,
            or the API refusing access.
    """
    from apache_beam.io.gcp.bigquery_tools import BigQueryWrapper, parse_table_schema_from_json, table_schema_to_dict
    from apache_beam.io.gcp.internal.clients import bigquery
    from google.auth.exceptions import GoogleAuthError

    schema = schema or table_schema()
    check_credentials()
    try:
        wrapper = BigQueryWrapper(pipeline_options=options)
        try:
            table = wrapper.get_table(target.project, target.dataset, target.table)
        except Exception as e:
            if _http_status(e) != 404:
                raise
            table = None
        if table is None:
            try:
                wrapper.client.datasets.Get(bigquery.BigqueryDatasetsGetRequest(projectId=target.project,
                                                                                 datasetId=target.dataset))
            except Exception as e:
                if _http_status(e) == 404:
                    raise UsageError(f"--output_table {target.spec}: the dataset {target.project}:{target.dataset} "
                                     f"does not exist; create it (bq mk --dataset --location LOCATION "
                                     f"{target.project}:{target.dataset}) or name another") from None
                raise
            table = bigquery.Table(
                tableReference=bigquery.TableReference(projectId=target.project, datasetId=target.dataset,
                                                       tableId=target.table),
                schema=parse_table_schema_from_json(json.dumps(schema)),
                timePartitioning=bigquery.TimePartitioning(type="DAY", field=PARTITION_COLUMN))
            wrapper.client.tables.Insert(bigquery.BigqueryTablesInsertRequest(
                projectId=target.project, datasetId=target.dataset, table=table))
            _LOG.info("created the BigQuery table %s, partitioned by day on %s", target.spec, PARTITION_COLUMN)
            return "created"
    except UsageError:
        raise
    except GoogleAuthError as e:
        raise UsageError(f"--output_table {target.spec}: the Google credentials found here do not work ({e}); run "
                         f"`{LOGIN}` again") from None
    except Exception as e:
        status = _http_status(e)
        what = {401: f"refused the credentials: run `{LOGIN}` again",
                403: "refused access: the account needs BigQuery Data Editor on the dataset and BigQuery Job User on "
                     "the project"}.get(status, "could not be reached or answered with an error")
        raise UsageError(f"--output_table {target.spec}: BigQuery {what} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]})") from None
    found = table_schema_to_dict(table.schema)["fields"] if table.schema else []
    problems = schema_differences(schema["fields"], found)
    if problems:
        raise UsageError(f"--output_table {target.spec}: the table's schema does not match the rows this job writes "
                         f"({'; '.join(problems)}). Table: {show_schema(found)}. Rows: {show_schema(schema['fields'])}. "
                         f"Write to a new table (the job creates it), or change this one to the rows' schema")
    partitioning = _partitioning(table)
    if partitioning != f"DAY on {PARTITION_COLUMN}":
        raise UsageError(f"--output_table {target.spec} is partitioned {partitioning or 'not at all'}; a run replaces "
                         f"its day ({target.partition}) only in a table partitioned by DAY on {PARTITION_COLUMN}: "
                         f"write to a new table (the job creates it so), or recreate this one")
    return "exists"


def to_table_rows(block: List[Dict[str, Any]], columns: Dict[str, str]) -> Iterable[Dict[str, Any]]:
    """A block of prediction rows -> one BigQuery row each: every column, ``id`` as null when absent, and
    the run's ``columns`` (engine, model, run id and run date)."""
    for row in block:
        yield {**row, "id": row.get("id"), **columns}


def _job_id(destination_and_job) -> str:
    _, job = destination_and_job
    return f"{job.projectId}:{job.location}.{job.jobId}" if getattr(job, "location", None) else \
        f"{job.projectId}:{job.jobId}"


def _entry(_, target: BigQueryTarget, jobs: List[str], rows: int):
    return "bigquery", {**target.describe(), "rows": rows, "jobs": sorted(jobs)}


class WritePredictionsToBigQuery(beam.PTransform):
    """Loads blocks of prediction rows into ``target``'s day with Beam's ``WriteToBigQuery``.

    Input: blocks (lists) of prediction rows, as the file sinks take them. Output: one
    ``("bigquery", entry)`` pair, emitted only once every load (and copy) job has finished, for
    the commit record: :meth:`BigQueryTarget.describe` plus ``rows`` and the BigQuery ``jobs``.

    Args:
        target: From :func:`resolve_target`, checked by :func:`check_table`.
        run_id: The run's id (a column of every row).
        schema: The rows' schema. Default: :func:`table_schema`.
    """

    def __init__(self, target: BigQueryTarget, run_id: str, schema: Optional[Dict[str, Any]] = None):
        super().__init__()
        self._target, self._run_id = target, run_id
        self._schema = schema or table_schema()

    def expand(self, blocks):
        target = self._target
        columns = {"engine": target.engine, "model": target.model, "run_id": self._run_id,
                   PARTITION_COLUMN: target.run_date}
        rows = blocks | "TableRows" >> beam.FlatMap(to_table_rows, columns)
        # CREATE_NEVER: check_table created the table at start with its partitioning; a table deleted
        # meanwhile fails the load, and with it the run, before anything is committed.
        written = rows | "Load" >> beam.io.WriteToBigQuery(
            table=f"{target.project}:{target.dataset}.{target.partition}", schema=self._schema,
            method=beam.io.WriteToBigQuery.Method.FILE_LOADS,
            create_disposition=beam.io.BigQueryDisposition.CREATE_NEVER,
            write_disposition=beam.io.BigQueryDisposition.WRITE_TRUNCATE)
        # Both come out of their bundle only after it waited for its jobs to finish (a failed job fails it).
        jobs = ((written.destination_load_jobid_pairs, written.destination_copy_jobid_pairs)
                | "AllJobs" >> beam.Flatten() | "JobIds" >> beam.Map(_job_id))
        count = rows | "CountRows" >> beam.combiners.Count.Globally()
        return (blocks.pipeline | "Loaded" >> beam.Create([None])
                | "Entry" >> beam.Map(_entry, target, beam.pvalue.AsList(jobs), beam.pvalue.AsSingleton(count)))
