"""transforms/bigquery.py: the table's schema, the target, and the start checks against a real server.

The server is bqemulator (``tests/bq_emulator.py``, fixture ``bigquery_server``); the checks go through
Beam's own BigQuery client with ``--bigquery_endpoint`` and an Application Default Credentials file, as
a job's launcher does. The job's writes are tested end to end in tests/test_bigquery_job.py.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from engines.base import UsageError
from transforms import bigquery
from transforms.bigquery import BigQueryTarget, check_table, resolve_target, table_schema

ROWS_SCHEMA = [
    {"name": "uri", "type": "STRING", "mode": "NULLABLE"},
    {"name": "id", "type": "STRING", "mode": "NULLABLE"},
    {"name": "top_k", "type": "RECORD", "mode": "REPEATED", "fields": [
        {"name": "class_id", "type": "INTEGER", "mode": "NULLABLE"},
        {"name": "label", "type": "STRING", "mode": "NULLABLE"},
        {"name": "score", "type": "FLOAT", "mode": "NULLABLE"}]},
    {"name": "engine", "type": "STRING", "mode": "REQUIRED"},
    {"name": "model", "type": "STRING", "mode": "REQUIRED"},
    {"name": "run_id", "type": "STRING", "mode": "REQUIRED"},
    {"name": "run_date", "type": "DATE", "mode": "REQUIRED"},
]


def _target(table="predictions", dataset="checks", run_date="2024-05-30"):
    return BigQueryTarget(project="my-project", dataset=dataset, table=table, run_date=run_date,
                          engine="onnxruntime", model="models/efficientnet_lite0.onnx")


def test_the_table_schema_is_the_prediction_rows_and_the_run():
    assert table_schema() == {"fields": ROWS_SCHEMA}


def test_a_column_the_rows_gain_reaches_the_schema():
    rows = pa.schema([("uri", pa.string()), ("logits", pa.list_(pa.float32())), ("photographer", pa.string()),
                      pa.field("width", pa.int32(), nullable=False)])
    fields = table_schema(rows)["fields"][:4]
    assert fields == [{"name": "uri", "type": "STRING", "mode": "NULLABLE"},
                      {"name": "logits", "type": "FLOAT", "mode": "REPEATED"},
                      {"name": "photographer", "type": "STRING", "mode": "NULLABLE"},
                      {"name": "width", "type": "INTEGER", "mode": "REQUIRED"}]
    with pytest.raises(TypeError, match="no list of lists"):
        table_schema(pa.schema([("grid", pa.list_(pa.list_(pa.float32())))]))


def test_kept_manifest_columns_become_nullable_strings_of_the_table_and_its_rows():
    from transforms.postprocess import RowLayout
    from transforms.sinks import prediction_schema

    fields = table_schema(prediction_schema(RowLayout(columns=("sku", "label_gt"))))["fields"]
    assert fields == ROWS_SCHEMA[:2] + [{"name": "sku", "type": "STRING", "mode": "NULLABLE"},
                                        {"name": "label_gt", "type": "STRING", "mode": "NULLABLE"}] + ROWS_SCHEMA[2:]
    run = {"engine": "onnxruntime", "model": "m.onnx", "run_id": "r1", "run_date": "2024-05-30"}
    block = [{"uri": "/x/1.jpg", "sku": "A-1", "label_gt": None, "top_k": []}]
    assert list(bigquery.to_table_rows(block, run)) == [
        {"uri": "/x/1.jpg", "sku": "A-1", "label_gt": None, "top_k": [], "id": None, **run}]


def test_the_target_names_the_day_it_replaces():
    target = _target()
    assert (target.spec, target.partition) == ("my-project:checks.predictions", "predictions$20240530")
    with pytest.raises(UsageError, match=r"leave out the partition .*predictions\$YYYYMMDD, from --run_date"):
        _target(table="predictions$20240530")


def test_resolve_target_takes_beams_table_specs_and_needs_a_bucket():
    options = PipelineOptions(["--project", "my-project", "--temp_location", "gs://b/tmp"])
    assert resolve_target(None, "2024-05-30", options, "onnxruntime", "m.onnx") is None
    for spec in ("my-project:d.t", "my-project.d.t", "d.t"):
        assert resolve_target(spec, "2024-05-30", options, "onnxruntime", "m.onnx").spec == "my-project:d.t"
    with pytest.raises(UsageError, match="--output_table not a table: Expected a table reference"):
        resolve_target("not a table", "2024-05-30", options, "onnxruntime", "m.onnx")
    with pytest.raises(UsageError, match="names no project: write PROJECT:DATASET.TABLE, or pass --project"):
        resolve_target("d.t", "2024-05-30", PipelineOptions(["--temp_location", "gs://b/t"]), "e", "m")
    with pytest.raises(UsageError, match=r"pass --temp_location gs://BUCKET/tmp \(got /tmp/x\)"):
        resolve_target("my-project:d.t", "2024-05-30", PipelineOptions(["--temp_location", "/tmp/x"]), "e", "m")


def test_no_credentials_names_the_login(monkeypatch, tmp_path):
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud login here either
    with pytest.raises(UsageError, match=r"needs Google credentials and found none .*run `gcloud auth "
                                         r"application-default login`"):
        bigquery.check_credentials()


@pytest.fixture
def server(bigquery_server, monkeypatch):
    """The emulator, with this process's Beam pointed at it as a job's launcher is."""
    from apache_beam.internal.gcp import auth

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(bigquery_server.credentials))
    # Beam caches the credentials it found process-wide; let it look again (another test may have seeded it).
    monkeypatch.setattr(auth._Credentials, "_credentials_init", False)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)
    client = bigquery_server.client()
    client.create_dataset("checks", exists_ok=True)
    return bigquery_server, client, PipelineOptions(bigquery_server.job_flags())


def test_a_missing_table_is_created_partitioned_by_day_on_run_date(server):
    _, client, options = server
    client.delete_table("my-project.checks.created", not_found_ok=True)
    assert check_table(_target("created"), options) == "created"
    table = client.get_table("my-project.checks.created")
    assert (table.time_partitioning.type_, table.time_partitioning.field) == ("DAY", "run_date")
    assert [f.to_api_repr() for f in table.schema] == [{**f, **({"fields": f["fields"]} if "fields" in f else {})}
                                                        for f in ROWS_SCHEMA]
    assert check_table(_target("created"), options) == "exists"


def test_a_missing_dataset_names_the_command_that_creates_it(server):
    with pytest.raises(UsageError, match=r"the dataset my-project:nowhere does not exist; create it \(bq mk "
                                         r"--dataset --location LOCATION my-project:nowhere\)"):
        check_table(_target(dataset="nowhere"), server[2])


def test_a_table_of_another_schema_stops_at_start_with_both_schemas(server):
    from google.cloud import bigquery as bq

    _, client, options = server
    client.delete_table("my-project.checks.other", not_found_ok=True)
    table = bq.Table("my-project.checks.other", schema=[
        bq.SchemaField("uri", "STRING"), bq.SchemaField("score", "FLOAT"),
        bq.SchemaField("top_k", "RECORD", mode="REPEATED", fields=[bq.SchemaField("class_id", "STRING")]),
        bq.SchemaField("run_date", "DATE")])
    table.time_partitioning = bq.TimePartitioning(field="run_date")
    client.create_table(table)
    with pytest.raises(UsageError) as caught:
        check_table(_target("other"), options)
    message = str(caught.value)
    for part in ("the table's schema does not match the rows this job writes",
                 "top_k.class_id is STRING NULLABLE in the table, INTEGER NULLABLE in the rows",
                 "score is in the table but not in the rows", "model is missing from the table",
                 "run_date is DATE NULLABLE in the table, DATE REQUIRED in the rows",
                 "Table: uri STRING, score FLOAT, top_k RECORD REPEATED <class_id STRING>, run_date DATE.",
                 "Rows: uri STRING, id STRING, top_k RECORD REPEATED <class_id INTEGER, label STRING, score FLOAT>, "
                 "engine STRING REQUIRED, model STRING REQUIRED, run_id STRING REQUIRED, run_date DATE REQUIRED."):
        assert part in message, message


def test_a_table_not_partitioned_by_day_on_run_date_is_refused(server):
    from google.cloud import bigquery as bq

    _, client, options = server
    client.delete_table("my-project.checks.flat", not_found_ok=True)
    client.create_table(bq.Table("my-project.checks.flat",
                                 schema=[bq.SchemaField.from_api_repr(f) for f in ROWS_SCHEMA]))
    with pytest.raises(UsageError, match=r"checks.flat is partitioned not at all; a run replaces its day "
                                         r"\(flat\$20240530\) only in a table partitioned by DAY on run_date"):
        check_table(_target("flat"), options)


def test_refused_credentials_name_the_login_again(server, monkeypatch, tmp_path):
    bad = tmp_path / "adc.json"
    bad.write_text(server[0].credentials.read_text().replace("/token", "/no-token-here"))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(bad))
    with pytest.raises(UsageError, match=r"credentials found here do not work .*run `gcloud auth "
                                         r"application-default login` again"):
        check_table(_target(), server[2])


def test_raw_outputs_become_repeated_floats_and_the_rows_model_is_the_runs_column():
    from transforms.postprocess import RowLayout
    from transforms.sinks import prediction_schema

    layout = RowLayout("raw", (("embedding", "float16", 768),), model="vit@sha256:1")
    fields = table_schema(prediction_schema(layout))["fields"]
    assert [f["name"] for f in fields] == ["uri", "id", "embedding", "engine", "model", "run_id", "run_date"]
    assert fields[2] == {"name": "embedding", "type": "FLOAT", "mode": "REPEATED"}
    threshold = table_schema(prediction_schema(RowLayout("threshold", threshold=0.5)))["fields"]
    assert [f["name"] for f in threshold][:3] == ["uri", "id", "classes"]
