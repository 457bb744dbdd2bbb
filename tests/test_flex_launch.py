"""A Flex Template launch, run the way Google's launcher runs it, with the network cut off.

Google's Python template launcher runs ``pipelines/classify_images.py`` with the template's
parameters plus ``--runner DataflowRunner --template_location gs://.../template_launches/<id>/job_object``
and Beam's project, region and staging options. Beam's DataflowRunner then writes the job object
to ``--template_location`` and returns without running anything (``apiclient.create_job``: "The
result can be None if there is no need to send a request to the service (e.g. template
creation)"); the launcher submits that object. The program must exit 0 right after writing it.

The launch runs in a network namespace of its own (``unshare -n``) in which only loopback is up
and a ``gcp-storage-emulator`` answers for gs://; nothing else can be reached, so the test also
proves that such a launch needs no Google service but Cloud Storage (docs/scheduling.md,
"What a launch needs from the network").
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import stop_process

pytest.importorskip("gcp_storage_emulator", reason="needs gcp-storage-emulator (pip install -e '.[test]')")
pytest.importorskip("google.cloud.storage", reason="needs google-cloud-storage (apache-beam[gcp])")

REPO = Path(__file__).resolve().parent.parent
BUCKET = "flex-launch"
PORT = 9023  # inside a network namespace of its own: no other process can hold it
EMULATOR = f"http://127.0.0.1:{PORT}"


def _isolation_missing():
    """Why a private network namespace cannot be made here, or None."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux / iproute2) to cut the launch off the network"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`unshare -n` is not permitted here ({probe.stderr.strip()}); run as root or allow user namespaces"
    return None


pytestmark = pytest.mark.skipif(_isolation_missing() is not None, reason=str(_isolation_missing()))

#: Run inside the namespace with google-cloud-storage against the emulator: waits for it, then
#: uploads (``put NAME LOCAL_FILE ...``) or prints a JSON listing {name: text or size} (``list``).
_CLIENT = r"""
import json, sys, time, urllib.request
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
url, bucket_name, command, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
deadline = time.monotonic() + 30
while True:
    try:
        urllib.request.urlopen(f"{url}/storage/v1/b/{bucket_name}", timeout=1).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
bucket = storage.Client(project="test", credentials=AnonymousCredentials(),
                        client_options={"api_endpoint": url}).bucket(bucket_name)
if command == "put":
    for name, path in zip(args[::2], args[1::2]):
        bucket.blob(name).upload_from_filename(path)
else:
    listing = {}
    for blob in bucket.client.list_blobs(bucket_name):
        data = blob.download_as_bytes()
        listing[blob.name] = data.decode() if blob.name.endswith("job_object") else len(data)
    print(json.dumps(listing))
"""


def _tiny_model(path: Path) -> None:
    """uint8 [N, 224, 224, 3] images -> float32 [N, 10] "logits": what the pipeline's checks ask of a model."""
    import onnx
    from onnx import TensorProto, helper

    images = helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 224, 224, 3])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
    weights = helper.make_tensor("weights", TensorProto.FLOAT, [3, 10], [0.1 * i for i in range(30)])
    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),
             helper.make_node("MatMul", ["mean", "weights"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [images], [logits], initializer=[axes, weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))


def _jpeg(path: Path) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())


@pytest.fixture
def namespace(tmp_path):
    """An emulator in a fresh network namespace (only loopback up); yields a function that runs argv in it."""
    log = open(tmp_path / "emulator.log", "wb")
    proc = subprocess.Popen(
        ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {sys.executable} -m gcp_storage_emulator start "
                                      f"--host 127.0.0.1 --port {PORT} --in-memory --default-bucket {BUCKET}"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def run(argv, **kw):
        return subprocess.run(["nsenter", f"--net=/proc/{proc.pid}/ns/net", *argv], **kw)

    # Until `unshare` has made its namespace, /proc/PID/ns/net is still this process's own: entering it then
    # would run the client on the host's network, where nothing listens (a race a busy machine loses).
    deadline = time.monotonic() + 60
    while os.readlink(f"/proc/{proc.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "emulator.log").read_text()
        time.sleep(0.05)
    try:
        yield run
    finally:
        stop_process(proc)
        log.close()


def _client(run, command, *args):
    done = run([sys.executable, "-c", _CLIENT, EMULATOR, BUCKET, command, *args], capture_output=True, text=True,
               timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_flex_template_launch_writes_the_job_object_and_exits_0_without_waiting(namespace, tmp_path):
    _tiny_model(tmp_path / "tiny.onnx")
    _jpeg(tmp_path / "a.jpg")
    _client(namespace, "put", "models/tiny.onnx", str(tmp_path / "tiny.onnx"), "photos/dt=2024-05-31/a.jpg",
            str(tmp_path / "a.jpg"))
    job_object = f"gs://{BUCKET}/template_launches/2024-05-31_01_02_03-123/job_object"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(REPO),
           "STORAGE_EMULATOR_HOST": EMULATOR}
    argv = [sys.executable, "-m", "pipelines.classify_images",
            # What the launcher adds (its own --job_name, --project, --region and staging options) ...
            "--runner=DataflowRunner", f"--template_location={job_object}", "--project=test-project",
            "--region=us-central1", f"--temp_location=gs://{BUCKET}/tmp", f"--staging_location=gs://{BUCKET}/staging",
            "--job_name=score-2024-05-31",
            # ... and the template's parameters.
            f"--input=gs://{BUCKET}/photos/dt={{date}}/*", f"--output=gs://{BUCKET}/scored/dt={{date}}",
            "--run_date=2024-05-31", f"--model=gs://{BUCKET}/models/tiny.onnx",
            "--sdk_container_image=us-central1-docker.pkg.dev/test-project/repo/beam-tensorrt:test",
            "--sdk_location=container",
            # The launcher runs inside the worker image, whose Python and Beam are the image's by
            # construction; this test's interpreter is not the image's (tests/test_launch_checks.py).
            "--allow_version_mismatch"]
    start = time.monotonic()
    done = namespace(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-4000:])
    assert "submitted" in done.stdout and job_object in done.stdout, done.stdout
    assert f"gs://{BUCKET}/scored/dt=2024-05-31" in done.stdout, done.stdout
    assert took < 120, f"the launch took {took:.0f} s: it waited for a job instead of returning"

    stored = json.loads(_client(namespace, "list"))
    job = json.loads(stored["template_launches/2024-05-31_01_02_03-123/job_object"])
    options = job["environment"]["sdkPipelineOptions"]["options"]
    assert options["output"] == f"gs://{BUCKET}/scored/dt=2024-05-31", options
    assert options["model"] == f"gs://{BUCKET}/models/tiny.onnx"
    assert any(name.startswith("staging/") for name in stored), sorted(stored)  # Beam staged the pipeline proto
    # Nothing ran, so nothing was written to the partition (no _SUCCESS read or written).
    assert not [name for name in stored if name.startswith("scored/")], sorted(stored)
