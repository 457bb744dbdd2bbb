"""``--output_table`` end to end: the README's BigQuery command, run as written against bqemulator.

The command is read from README.md and run in a folder holding the demo's images (``pipelines.demo``
writes them, as ``make demo`` does), with only the changes the README lists beside it: the emulator's
``--bigquery_endpoint``, and in the environment the storage emulator, a credentials file and
``tests/local_runner_options`` (tests/bigquery_server.py). The rows are read back from the server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bigquery_server import REPO

pytest.importorskip("skimage", reason="needs scikit-image for the demo's photos (pip install -e '.[test]')")
MODEL = REPO / "models" / "efficientnet_lite0.onnx"
pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} is missing: run `make model` first")


def readme_command() -> list:
    """The README's BigQuery example: the classify_images command that passes --output_table."""
    text = (REPO / "README.md").read_text()
    commands = [re.sub(r"\\\n\s*", " ", m) for m in re.findall(r"^\.venv/bin/python -m pipelines\.classify_images "
                                                                 r"(?:[^\n]*\\\n)*[^\n]*", text, flags=re.M)]
    (command,) = [c for c in commands if "--output_table" in c]
    argv = shlex.split(command)
    return [sys.executable, *argv[1:]]


def _run(server, folder: Path, argv: list, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(argv + server.job_flags(), cwd=folder, env=env or server.job_env(), capture_output=True,
                          text=True, timeout=300)


def _with(argv: list, flag: str, value: str) -> list:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


@pytest.fixture(scope="module")
def demo(bigquery_server, tmp_path_factory):
    """A folder with the demo's images in demo_images/ (11 photos, 5 broken files, a manifest), the README's
    command, and the dataset it names (the README's `bq mk` step)."""
    from pipelines.demo import write_broken, write_photos

    folder = tmp_path_factory.mktemp("readme")
    images = folder / "demo_images"
    images.mkdir()
    inputs = write_photos(str(images)) + write_broken(str(images))
    (images / "manifest.txt").write_text("\n".join(os.path.abspath(p) for p in inputs) + "\n")
    argv = readme_command()
    project, dataset = argv[argv.index("--output_table") + 1].split(".")[0].split(":")
    bigquery_server.client().create_dataset(f"{project}.{dataset}", exists_ok=True)
    return folder, argv


def _committed(folder: Path, day: str):
    partition = folder / "scored" / f"dt={day}"
    record = json.loads((partition / "_SUCCESS").read_text())
    rows = [json.loads(line) for name in record["files"]["predictions"]
            for line in (partition / name).read_text().splitlines() if line.strip()]
    stats = json.loads((partition / record["run_folder"] / "stats.json").read_text())
    return record, rows, stats


def _table_rows(server, table: str, day: str):
    query = f"SELECT * FROM `{table.replace(':', '.')}` WHERE run_date = DATE '{day}' ORDER BY uri"
    return [dict(row) for row in server.client().query(query).result()]


@pytest.fixture(scope="module")
def first_run(bigquery_server, demo):
    folder, argv = demo
    done = _run(bigquery_server, folder, argv)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, _committed(folder, "2024-05-30")[0]["run_id"]


def test_the_readme_command_loads_the_rows_of_its_run(bigquery_server, demo, first_run):
    folder, argv = demo
    table = argv[argv.index("--output_table") + 1]
    record, rows, stats = _committed(folder, "2024-05-30")
    assert "scored 11 images, 6 dead letters" in first_run[0].stdout
    entry = record["bigquery"]
    assert {k: entry[k] for k in ("table", "partition", "partition_column", "method", "write_disposition", "rows")} \
        == {"table": table, "partition": "predictions$20240530", "partition_column": "run_date",
            "method": "FILE_LOADS", "write_disposition": "WRITE_TRUNCATE", "rows": 11}
    assert len(entry["jobs"]) == 1 and "LOAD_STEP" in entry["jobs"][0], entry
    assert stats["bigquery"] == entry and stats["settings"]["output_table"] == table
    loaded = _table_rows(bigquery_server, table, "2024-05-30")
    # The rows' "model" (the model's file name and sha256 prefix) is the table's run column of that name.
    assert {row["model"] for row in rows} == {record["model"]["identity"]} and \
        record["model"]["identity"].startswith("efficientnet_lite0.onnx@sha256:")
    run = {"engine": "onnxruntime", "model": record["model"]["identity"], "run_id": record["run_id"]}
    assert [{k: v for k, v in row.items() if k != "run_date"} for row in loaded] == \
        sorted(({**row, "id": row.get("id"), **run} for row in rows), key=lambda r: r["uri"])
    assert {str(row["run_date"]) for row in loaded} == {"2024-05-30"}


def test_a_rerun_replaces_its_day_and_leaves_the_others(bigquery_server, demo, first_run):
    folder, argv = demo
    table = argv[argv.index("--output_table") + 1]
    next_day = _run(bigquery_server, folder, _with(argv, "--run_date", "2024-05-31"))
    assert next_day.returncode == 0, next_day.stderr[-3000:]
    again = _run(bigquery_server, folder, argv)
    assert again.returncode == 0, again.stderr[-3000:]
    for day in ("2024-05-30", "2024-05-31"):
        record, rows, _ = _committed(folder, day)
        loaded = _table_rows(bigquery_server, table, day)
        assert len(loaded) == len(rows) == record["bigquery"]["rows"] == 11
        assert {row["run_id"] for row in loaded} == {record["run_id"]}, day  # one copy: the last run's
    assert _committed(folder, "2024-05-30")[0]["run_id"] != first_run[1]


def test_a_table_of_another_schema_stops_the_job_at_start(bigquery_server, demo, tmp_path):
    from google.cloud import bigquery as bq

    folder, argv = demo
    client = bigquery_server.client()
    project, dataset = argv[argv.index("--output_table") + 1].split(".")[0].split(":")
    table = bq.Table(f"{project}.{dataset}.old_layout", schema=[bq.SchemaField("uri", "STRING"),
                                                                bq.SchemaField("top1", "STRING"),
                                                                bq.SchemaField("run_date", "DATE")])
    table.time_partitioning = bq.TimePartitioning(field="run_date")
    client.create_table(table, exists_ok=True)
    output = tmp_path / "out"
    done = _run(bigquery_server, folder, _with(_with(argv, "--output_table", f"{project}:{dataset}.old_layout"),
                                               "--output", str(output)))
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(r"error: --output_table \S+old_layout: the table's schema does not match the rows this job "
                     r"writes \(.*top1 is in the table but not in the rows.*\)\. Table: uri STRING, top1 STRING, "
                     r"run_date DATE\. Rows: uri STRING, id STRING, top_k RECORD REPEATED <", done.stderr), done.stderr
    assert not output.exists()
    assert client.list_rows(f"{project}.{dataset}.old_layout").total_rows == 0


def test_no_credentials_stop_the_job_at_start_naming_the_login(bigquery_server, demo, tmp_path):
    folder, argv = demo
    env = bigquery_server.job_env(CLOUDSDK_CONFIG=str(tmp_path))
    del env["GOOGLE_APPLICATION_CREDENTIALS"]
    done = _run(bigquery_server, folder, _with(argv, "--output", str(tmp_path / "out")), env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "needs Google credentials and found none" in done.stderr
    assert "run `gcloud auth application-default login`" in done.stderr
