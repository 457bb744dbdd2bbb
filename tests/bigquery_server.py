"""A BigQuery-speaking server and the Cloud Storage it loads from, for the tests (fixture ``bigquery_server``).

Two processes on 127.0.0.1, started once per test session:

- ``gcp-storage-emulator`` (``tests/gcs_emulator.py``) on disk, holding bucket :data:`BUCKET`: Beam's file
  loads write their JSON files to ``--temp_location gs://BUCKET/tmp`` through ``STORAGE_EMULATOR_HOST``.
- ``bqemulator`` (``tests/bq_emulator.py``, in ``.venv-bq``), whose load jobs read ``gs://BUCKET/...``
  from the same folder (``BQEMU_GCS_LOCAL_ROOT``): the storage emulator keeps an object at
  ``DIR/.cloudstorage/BUCKET/NAME``, where bqemulator resolves ``gs://BUCKET/NAME`` under that root.

A job reaches them as it reaches Google, with the changes :meth:`BigQueryServer.job_env` and
:meth:`BigQueryServer.job_flags` make (the README lists them beside its BigQuery example): an
Application Default Credentials file whose token URL is the emulator's, ``STORAGE_EMULATOR_HOST``,
``--bigquery_endpoint``, and ``tests/local_runner_options`` on ``PYTHONPATH`` so that Beam's
load-job steps on the local runner see that endpoint too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.processes import stop_process

REPO = Path(__file__).resolve().parent.parent
BQ_PYTHON = REPO / ".venv-bq" / "bin" / "python"
PROJECT = "my-project"
BUCKET = "my-bucket"
STARTUP_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _start(argv, env, cwd: Path, url: str, log: Path, what: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if _answers(url):
            return proc
        time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError(f"{what} did not answer at {url} within {STARTUP_TIMEOUT_S} s; its output:\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


@dataclasses.dataclass
class BigQueryServer:
    """The running servers: ``endpoint`` (BigQuery REST), ``storage`` (GCS) and the credentials file."""

    endpoint: str
    storage: str
    credentials: Path
    processes: tuple

    def job_env(self, **extra) -> dict:
        """The environment of a job run against the servers (a copy of this process's, plus these)."""
        path = os.pathsep.join([str(REPO), str(REPO / "tests" / "local_runner_options")])
        return {**os.environ, "STORAGE_EMULATOR_HOST": self.storage,
                "GOOGLE_APPLICATION_CREDENTIALS": str(self.credentials), "PYTHONPATH": path, **extra}

    def job_flags(self) -> list:
        return ["--bigquery_endpoint", self.endpoint]

    def client(self):
        """A google-cloud-bigquery client of the server, for the tests to read and prepare tables."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        return bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(),
                               client_options={"api_endpoint": self.endpoint})


def start(workdir: Path) -> BigQueryServer:
    """Starts both servers with their data under ``workdir``."""
    gcs_port, rest_port, grpc_port = _free_port(), _free_port(), _free_port()
    storage = f"http://127.0.0.1:{gcs_port}"
    endpoint = f"http://127.0.0.1:{rest_port}"
    gcs = _start([sys.executable, "-m", "tests.gcs_emulator", "start", "--host", "127.0.0.1", "--port", str(gcs_port),
                  "--default-bucket", BUCKET],
                 {**os.environ, "PYTHONPATH": str(REPO), "STORAGE_BASE": str(workdir)}, REPO,
                 f"{storage}/storage/v1/b/{BUCKET}", workdir / "gcs-emulator.log", "gcp-storage-emulator")
    try:
        bq = _start([str(BQ_PYTHON), "-m", "tests.bq_emulator", "start", "--rest-port", str(rest_port),
                     "--grpc-port", str(grpc_port), "--project", PROJECT, "--log-level", "warning"],
                    {**os.environ, "PYTHONPATH": str(REPO), "BQEMU_GCS_LOCAL_ROOT": str(workdir / ".cloudstorage")},
                    REPO, f"{endpoint}/bigquery/v2/projects/{PROJECT}/datasets", workdir / "bq-emulator.log",
                    "bqemulator")
    except BaseException:
        stop_process(gcs)
        raise
    # What `gcloud auth application-default login` writes for a workforce identity federation user: the one
    # kind of Application Default Credentials whose token URL google-auth reads from the file.
    credentials = workdir / "application_default_credentials.json"
    credentials.write_text(json.dumps({
        "type": "external_account_authorized_user", "audience": "//iam.googleapis.com/locations/global/"
        "workforcePools/tests/providers/bq-emulator", "client_id": "tests", "client_secret": "tests",
        "refresh_token": "tests", "token_url": f"{endpoint}/token"}))
    return BigQueryServer(endpoint=endpoint, storage=storage, credentials=credentials, processes=(bq, gcs))
