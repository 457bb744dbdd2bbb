"""``bqemulator`` with what the tests' BigQuery server needs and the package does not do offline.

Run in the emulator's own venv (``.venv-bq``, built by ``make .venv-bq/.installed`` from
requirements-bq.txt; bqemulator needs Python >= 3.11 and packages the job's venv must not get)::

    .venv-bq/bin/python -m tests.bq_emulator start --rest-port 9050 --grpc-port 9060 --project test-project
    .venv-bq/bin/python -m tests.bq_emulator place-extensions     # once, after pip install (make does it)

bqemulator 1.4.0 serves BigQuery's REST and gRPC APIs on DuckDB. Three changes, applied here (never in
site-packages), then the emulator starts as its ``bqemulator start`` command would:

1. DuckDB's ``spatial`` extension is loaded at start (``INSTALL spatial``), which downloads it unless it
   is already in DuckDB's extension directory; CI has no network but PyPI. ``place-extensions`` copies
   the ``.duckdb_extension`` files that PyPI's ``duckdb-extension-spatial`` and ``duckdb-extension-avro``
   ship into ``.venv-bq/duckdb_extensions/``, and every DuckDB connection here is pointed at it (nothing
   is written to ``~/.duckdb``).
2. A token endpoint, ``POST /token``, answering every OAuth refresh with a fixed access token, so that
   the job authenticates as it does against Google: the tests write an Application Default Credentials
   file whose ``token_url`` is this endpoint (``external_account_authorized_user``, the one kind whose
   token URL google-auth takes from the file; ``authorized_user`` always uses Google's). Without
   credentials, Beam's BigQuery client (apitools) starts an interactive browser login and waits forever.
   The emulator itself checks no token.
3. Loads into one day of a table partitioned by day on a DATE column, ``TABLE$YYYYMMDD``, the destination
   a scheduled run writes with ``WRITE_TRUNCATE`` (bqemulator refuses the ``$`` as a table id). As
   BigQuery documents (https://cloud.google.com/bigquery/docs/managing-partitioned-table-data, "Write
   data to a specific partition"): ``WRITE_TRUNCATE`` replaces that day's rows and no other's,
   ``WRITE_APPEND`` adds to it, ``WRITE_EMPTY`` fails unless the day is empty, and a job with any row of
   another day fails and changes nothing. The rows are loaded into a staging table first, checked, and
   then swapped into the day in one DuckDB transaction. Only an existing table partitioned on a column is
   handled (the job creates its table at start); anything else is refused by name.
"""

from __future__ import annotations

import copy
import re
import sys
import uuid
from pathlib import Path

import duckdb

#: Where the Makefile puts the DuckDB extensions (``v<duckdb>/linux_amd64/*.duckdb_extension``).
EXTENSIONS = Path(sys.prefix) / "duckdb_extensions"
#: The fixed access token the token endpoint hands out.
TOKEN = "bq-emulator-token"
_PARTITION = re.compile(r"^(?P<table>[A-Za-z0-9_]+)\$(?P<day>\d{8})$")

_connect = duckdb.connect


def _connect_offline(database=":memory:", read_only=False, config=None, **kwargs):
    return _connect(database, read_only=read_only, config={"extension_directory": str(EXTENSIONS), **(config or {})},
                    **kwargs)


def _with_token_endpoint(create_app):
    def create(context):
        app = create_app(context)

        @app.post("/token")
        def token():  # the reply of an OAuth token endpoint (RFC 6749, section 5.1)
            return {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600}

        return app

    return create


def _with_partition_loads(execute_load_job):
    from bqemulator.catalog.etag import generate_etag
    from bqemulator.catalog.models import JobMeta
    from bqemulator.domain.errors import InvalidQueryError
    from bqemulator.jobs import executor

    async def load(project_id, job_id, config, ctx):
        load_config = config.get("load", {})
        destination = load_config.get("destinationTable", {})
        matched = _PARTITION.match(destination.get("tableId", ""))
        if not matched:
            return await execute_load_job(project_id, job_id, config, ctx)
        now = ctx.clock.now()
        table = matched["table"]
        whole = copy.deepcopy(config)
        whole["load"]["destinationTable"]["tableId"] = table
        job = executor._parse_load_job_config(project_id, whole)
        meta = ctx.catalog.get_table(job.project_id, job.dataset_id, table)
        partitioning = meta.time_partitioning if meta is not None else None
        if partitioning is None or partitioning.type != "DAY" or not partitioning.field:
            raise InvalidQueryError(f"tests.bq_emulator loads into {destination['tableId']} only when {table} exists "
                                    f"and is partitioned by DAY on a column; it is {partitioning}")
        day, column = matched["day"], partitioning.field
        date = f"{day[:4]}-{day[4:6]}-{day[6:]}"
        paths = [executor._resolve_uri(uri, ctx) for uri in job.source_uris]
        for path in paths:
            executor._validate_local_path(path)
        staging = f'"bq_emulator_staging_{uuid.uuid4().hex}"'
        async with ctx.engine.write_lock():
            ctx.engine.execute(f"CREATE TEMP TABLE {staging} AS SELECT * FROM {job.target_ref} LIMIT 0")
            try:
                for path in paths:
                    executor._LOAD_FORMAT_HANDLERS[job.source_format](path, staging, ctx)
                loaded, foreign = ctx.engine.execute(
                    f'SELECT COUNT(*), COUNT(*) FILTER (WHERE "{column}" IS DISTINCT FROM DATE \'{date}\') '
                    f"FROM {staging}").fetchone()
                if foreign:
                    raise InvalidQueryError(f"Some rows belong to different partitions rather than destination "
                                            f"partition {day} ({foreign} of {loaded} rows)")
                in_day = f'"{column}" = DATE \'{date}\''
                if job.write_disposition == "WRITE_EMPTY":
                    (present,) = ctx.engine.execute(f"SELECT COUNT(*) FROM {job.target_ref} WHERE {in_day}").fetchone()
                    if present:
                        raise InvalidQueryError(f"Partition {destination['tableId']} is not empty and "
                                                f"writeDisposition is WRITE_EMPTY")
                ctx.engine.execute("BEGIN TRANSACTION")
                try:
                    if job.write_disposition == "WRITE_TRUNCATE":
                        ctx.engine.execute(f"DELETE FROM {job.target_ref} WHERE {in_day}")
                    ctx.engine.execute(f"INSERT INTO {job.target_ref} SELECT * FROM {staging}")
                    ctx.engine.execute("COMMIT")
                except BaseException:
                    ctx.engine.execute("ROLLBACK")
                    raise
            finally:
                ctx.engine.execute(f"DROP TABLE IF EXISTS {staging}")
        total = executor._refresh_load_row_count(job, ctx)
        ctx.catalog.update_table(ctx.catalog.get_table(job.project_id, job.dataset_id, table).model_copy(
            update={"num_rows": total}))
        return JobMeta(project_id=project_id, job_id=job_id, job_type="LOAD", state="DONE", configuration=config,
                       statistics={"load": {"outputRows": str(loaded)}}, creation_time=now, start_time=now,
                       end_time=ctx.clock.now(), etag=generate_etag(project_id, job_id, str(now)))

    return load


def place_extensions() -> Path:
    """Copies the extensions PyPI's ``duckdb-extension-*`` packages ship to :data:`EXTENSIONS`, laid out as
    DuckDB looks for them (``v<version>/<platform>/NAME.duckdb_extension``); ``make`` runs this once."""
    import glob
    import shutil

    folder = EXTENSIONS / f"v{duckdb.__version__}" / duckdb.sql("PRAGMA platform").fetchone()[0]
    folder.mkdir(parents=True, exist_ok=True)
    pattern = Path(sys.prefix) / "lib" / "python*" / "site-packages" / "duckdb_extension_*" / "extensions" / "*"
    shipped = glob.glob(str(pattern / "*.duckdb_extension"))
    if not shipped:
        raise SystemExit(f"no .duckdb_extension files under {pattern}: pip install -r requirements-bq.txt first")
    for path in shipped:
        shutil.copy(path, folder)
    return folder


def install() -> None:
    """Applies the three changes (before the server module builds its app)."""
    from bqemulator import server
    from bqemulator.api.routes import jobs as job_routes
    from bqemulator.jobs import executor

    duckdb.connect = _connect_offline
    server.create_app = _with_token_endpoint(server.create_app)
    partition_loads = _with_partition_loads(executor.execute_load_job)
    executor.execute_load_job = job_routes.execute_load_job = partition_loads


if __name__ == "__main__":
    if sys.argv[1:] == ["place-extensions"]:
        print(f"DuckDB extensions in {place_extensions()}")
        sys.exit(0)
    install()
    from bqemulator.cli import main

    main(sys.argv[1:])
