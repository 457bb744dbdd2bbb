"""gs:// end to end: the scoring pipeline reads from and writes to a real GCS-speaking server.

The server is ``gcp-storage-emulator`` (the ``test`` extra), started on 127.0.0.1 on a free port
by a module fixture. Beam's GCS filesystem (``apache_beam.io.gcp.gcsio``) builds a
``google.cloud.storage.Client`` for every operation; that client sends everything to
``STORAGE_EMULATOR_HOST`` when the variable is set. Beam first looks for Google credentials and
caches the answer process-wide in ``apache_beam.internal.gcp.auth._Credentials``; with none to
find, ``google.auth.default()`` probes the GCE metadata server and Beam retries it for about 20 s
before connecting anonymously (``--no_auth`` does not change this for GCS in Beam 2.77). The
fixture seeds that cache with "no credentials" so Beam goes straight to its anonymous client, which
honours ``STORAGE_EMULATOR_HOST``. Both changes are undone when the module's tests end.

Beam 2.77 caches no GCS client (``GCSFileSystem`` builds a new ``GcsIO`` per call), so the
variable takes effect for every call made after the fixture sets it; the fixture still proves with
a probe object that Beam's writes land on the emulator before any pipeline runs. The pipeline runs
on the DirectRunner in this process (RunInference with exception handling keeps it on the in-process
FnApiRunner), so the seeded cache is the one Beam's workers use.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.processes import stop_process

pytest.importorskip("gcp_storage_emulator", reason="needs gcp-storage-emulator (pip install -e '.[test]')")
pytest.importorskip("google.cloud.storage", reason="needs google-cloud-storage (apache-beam[gcp])")
pytest.importorskip("skimage", reason="needs scikit-image for the test photos (pip install -e '.[test]')")

MODEL = Path(__file__).resolve().parent.parent / "models" / "efficientnet_lite0.onnx"
pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} is missing: run `make model` first")

BUCKET = "scoring-test"
STARTUP_TIMEOUT_S = 30.0
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian Mau
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug
#: Objects under gs://BUCKET/images/ that are not images, and the dead-letter reason each must get.
BROKEN = {
    "empty.jpg": (b"", r"^empty file \(0 bytes\)"),
    "notes.jpg": (b"shopping list: milk, eggs, coffee\n", r"^not an image: the file holds text"),
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_emulator(workdir: Path):
    """Starts the emulator as a subprocess and waits (bounded) until it answers for BUCKET.

    Returns:
        (process, base URL). Retries on another port if the chosen one was taken meanwhile.
    """
    last_error = ""
    for attempt in range(3):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = workdir / f"emulator-{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.gcs_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
                 "--in-memory", "--default-bucket", BUCKET],
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1) as response:
                    if json.load(response).get("name") == BUCKET:
                        return proc, url
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.05)
        stop_process(proc)
        last_error = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"gcp-storage-emulator did not answer on 127.0.0.1 within {STARTUP_TIMEOUT_S} s "
                       f"(3 tries); its last output:\n{last_error}")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A running emulator with BUCKET, Beam pointed at it; yields a google-cloud-storage bucket handle."""
    from apache_beam.internal.gcp import auth
    from apache_beam.io.filesystems import FileSystems
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    proc, url = _start_emulator(tmp_path_factory.mktemp("gcs-emulator"))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", url)
            # Beam's process-wide credentials cache in the state it reaches when it finds none.
            mp.setattr(auth._Credentials, "_credentials_init", True)
            mp.setattr(auth._Credentials, "_credentials", None)
            client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": url})
            bucket = client.bucket(BUCKET)
            # Prove Beam's filesystem reaches this server (and not GCS) before any pipeline runs.
            with FileSystems.create(f"gs://{BUCKET}/probe/beam.txt") as f:
                f.write(b"written by Beam")
            probe = bucket.blob("probe/beam.txt")
            if not probe.exists() or probe.download_as_bytes() != b"written by Beam":
                raise RuntimeError(f"Beam's GCS filesystem did not write to the emulator at {url}")
            probe.delete()
            yield bucket
    finally:
        stop_process(proc)


def _jpeg(name: str) -> bytes:
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(gcs):
    """Uploads chelsea.jpg, coffee.jpg and the BROKEN files to gs://BUCKET/images/; returns their URIs."""
    uris = {}
    for name in ("chelsea", "coffee"):
        gcs.blob(f"images/{name}.jpg").upload_from_string(_jpeg(name), content_type="image/jpeg")
        uris[f"{name}.jpg"] = f"gs://{BUCKET}/images/{name}.jpg"
    for name, (content, _) in BROKEN.items():
        gcs.blob(f"images/{name}").upload_from_string(content, content_type="image/jpeg")
        uris[name] = f"gs://{BUCKET}/images/{name}"
    listed = sorted(b.name for b in gcs.client.list_blobs(BUCKET, prefix="images/"))
    assert listed == sorted(f"images/{n}" for n in uris), listed
    assert gcs.blob("images/empty.jpg").exists() and gcs.get_blob("images/empty.jpg").size == 0
    return uris


def _read_outputs(bucket, prefix: str):
    """Reads predictions, dead letters and stats.json of the partition gs://BUCKET/<prefix>/ from the
    emulator, through the files its _SUCCESS lists (as a reader must)."""
    names = sorted(b.name for b in bucket.client.list_blobs(BUCKET, prefix=f"{prefix}/"))
    record = json.loads(bucket.blob(f"{prefix}/_SUCCESS").download_as_text())

    def rows(kind):
        return [json.loads(line) for n in record["files"][kind]
                for line in bucket.blob(f"{prefix}/{n}").download_as_text().splitlines() if line.strip()]

    stats = json.loads(bucket.blob(f"{prefix}/{record['run_folder']}/stats.json").download_as_text())
    return {"names": names, "predictions": rows("predictions"), "dead": rows("dead_letter"), "stats": stats,
            "record": record}


def _run(argv):
    from pipelines import classify_images

    return classify_images.run(argv + ["--runner", "DirectRunner", "--batch_size", "4", "--progress_every_s", "0"])


def _class_ids(row, k):
    return [entry["class_id"] for entry in row["top_k"][:k]]


@pytest.fixture(scope="module")
def glob_run(gcs, images):
    """One run over the glob gs://BUCKET/images/* into gs://BUCKET/out; returns (returned stats, outputs)."""
    returned = _run(["--input", f"gs://{BUCKET}/images/*", "--output", f"gs://{BUCKET}/out"])
    return returned, _read_outputs(gcs, "out")


def test_glob_every_input_ends_as_exactly_one_row(images, glob_run):
    _, out = glob_run
    predicted = [r["uri"] for r in out["predictions"]]
    dead = [r["uri"] for r in out["dead"]]
    assert sorted(predicted) == sorted([images["chelsea.jpg"], images["coffee.jpg"]])
    assert sorted(dead) == sorted(images[n] for n in BROKEN)
    assert sorted(predicted + dead) == sorted(images.values())
    # Only the committed run is left in --output: its _SUCCESS and the files it lists, no temporary objects.
    assert out["names"] == sorted(["out/_SUCCESS"] + [f"out/{n}" for n in sum(out["record"]["files"].values(), [])])


def test_glob_real_photos_get_expected_classes(images, glob_run):
    _, out = glob_run
    by_uri = {r["uri"]: r for r in out["predictions"]}
    chelsea, coffee = by_uri[images["chelsea.jpg"]], by_uri[images["coffee.jpg"]]
    assert len(chelsea["top_k"]) == 5 and len(coffee["top_k"]) == 5
    assert CAT_CLASSES & set(_class_ids(chelsea, 5)), chelsea
    assert COFFEE_CLASSES & set(_class_ids(coffee, 3)), coffee
    for row in (chelsea, coffee):
        scores = [entry["score"] for entry in row["top_k"]]
        assert scores == sorted(scores, reverse=True) and 0.0 < sum(scores) <= 1.0 + 1e-5, row
        assert all(isinstance(entry["label"], str) and entry["label"] for entry in row["top_k"]), row
        assert "id" not in row  # a glob has no ids


def test_glob_broken_files_are_dead_letters_with_reasons(images, glob_run):
    _, out = glob_run
    by_uri = {r["uri"]: r for r in out["dead"]}
    for name, (_, reason) in BROKEN.items():
        row = by_uri[images[name]]
        assert row["stage"] == "decode", row
        assert re.search(reason, row["error"]), row
        assert "id" not in row


def test_glob_stats_json_counts(glob_run):
    returned, out = glob_run
    stats = out["stats"]
    assert (stats["predictions"], stats["dead_letters"], stats["images"]) == (2, 2, 4), stats
    assert stats["settings"]["input"] == f"gs://{BUCKET}/images/*"
    assert stats["settings"]["output"] == f"gs://{BUCKET}/out"
    assert stats["bytes_read"] == sum(len(_jpeg(n)) for n in ("chelsea", "coffee")) + sum(
        len(content) for content, _ in BROKEN.values())
    assert stats == json.loads(json.dumps(returned))  # stats.json is what run() returned


def test_manifest_missing_object_is_a_read_dead_letter_with_its_id(gcs, images):
    missing = f"gs://{BUCKET}/images/missing.jpg"
    manifest = [{"uri": images["chelsea.jpg"], "id": "cat-1"}, {"uri": images["coffee.jpg"], "id": "cup-2"},
                {"uri": missing, "id": "gone-3"}]
    gcs.blob("list.jsonl").upload_from_string("".join(json.dumps(row) + "\n" for row in manifest),
                                              content_type="application/json")
    assert not gcs.blob("images/missing.jpg").exists()

    returned = _run(["--input", f"gs://{BUCKET}/list.jsonl", "--output", f"gs://{BUCKET}/out-manifest"])

    out = _read_outputs(gcs, "out-manifest")
    assert sorted((r["uri"], r["id"]) for r in out["predictions"]) == [
        (images["chelsea.jpg"], "cat-1"), (images["coffee.jpg"], "cup-2")]
    assert len(out["dead"]) == 1, out["dead"]
    dead = out["dead"][0]
    assert (dead["uri"], dead["id"], dead["stage"]) == (missing, "gone-3", "read"), dead
    assert re.search(r"^cannot read file \(.*(404|[Nn]ot ?[Ff]ound).*\); check the path exists", dead["error"]), dead
    by_id = {r["id"]: r for r in out["predictions"]}
    assert CAT_CLASSES & set(_class_ids(by_id["cat-1"], 5)), by_id["cat-1"]
    assert COFFEE_CLASSES & set(_class_ids(by_id["cup-2"], 3)), by_id["cup-2"]
    assert (returned["predictions"], returned["dead_letters"]) == (2, 1), returned
    assert (out["stats"]["predictions"], out["stats"]["dead_letters"]) == (2, 1), out["stats"]


def test_folder_without_trailing_slash_fails_at_start_with_the_fix(gcs, images):
    from engines.base import UsageError

    with pytest.raises(UsageError, match=r"matches no files.*trailing slash \(gs://bucket/dir/\)"):
        _run(["--input", f"gs://{BUCKET}/images", "--output", f"gs://{BUCKET}/out-noslash"])


def _listed(bucket, prefix):
    return sorted(b.name[len(prefix) + 1:] for b in bucket.client.list_blobs(BUCKET, prefix=f"{prefix}/"))


def test_rerun_replaces_a_gcs_partition_and_removes_stale_objects(gcs, images):
    out = f"gs://{BUCKET}/replace"
    _run(["--input", f"gs://{BUCKET}/images/*", "--output", out])
    first = json.loads(gcs.blob("replace/_SUCCESS").download_as_text())
    # Objects an earlier run with other settings would have left.
    gcs.blob("replace/predictions-00001-of-00002.jsonl").upload_from_string('{"uri": "gs://old", "top_k": []}\n')
    gcs.blob("replace/dead_letter-00003-of-00004.jsonl").upload_from_string('{"uri": "gs://old"}\n')

    _run(["--input", f"gs://{BUCKET}/images/*", "--output", out])

    success = json.loads(gcs.blob("replace/_SUCCESS").download_as_text())
    assert success["run_id"] != first["run_id"]
    assert _listed(gcs, "replace") == sorted(sum(success["files"].values(), []) + ["_SUCCESS"])
    outputs = _read_outputs(gcs, "replace")
    assert sorted(r["uri"] for r in outputs["predictions"]) == sorted([images["chelsea.jpg"], images["coffee.jpg"]])
    assert sorted(r["uri"] for r in outputs["dead"]) == sorted(images[n] for n in BROKEN)
    assert (success["predictions"], success["dead_letters"], success["unaccounted"]) == (2, 2, 0)


def test_skip_scored_on_gcs_scores_new_and_changed_objects_only(gcs):
    gcs.blob("daily/chelsea.jpg").upload_from_string(_jpeg("chelsea"), content_type="image/jpeg")
    gcs.blob("daily/coffee.jpg").upload_from_string(_jpeg("coffee"), content_type="image/jpeg")
    gcs.blob("daily/notes.jpg").upload_from_string(b"not a photo\n", content_type="image/jpeg")
    day = ["--input", f"gs://{BUCKET}/daily/*", "--output", f"gs://{BUCKET}/scored/dt={{date}}",
           "--skip_scored", f"gs://{BUCKET}/scored"]
    first = _run(day + ["--run_date", "2024-05-30"])
    assert (first["predictions"], first["dead_letters"], first["skipped"]) == (2, 1, 0)

    gcs.blob("daily/rocket.jpg").upload_from_string(_jpeg("rocket"), content_type="image/jpeg")  # new
    from PIL import Image
    import skimage.data
    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(buf, format="JPEG", quality=60)
    gcs.blob("daily/coffee.jpg").upload_from_string(buf.getvalue(), content_type="image/jpeg")  # changed
    second = _run(day + ["--run_date", "2024-05-31"])

    out = _read_outputs(gcs, "scored/dt=2024-05-31")
    assert sorted(r["uri"] for r in out["predictions"]) == [f"gs://{BUCKET}/daily/coffee.jpg",
                                                            f"gs://{BUCKET}/daily/rocket.jpg"]
    assert out["dead"] == []
    assert (second["skipped"], second["inputs"], second["unaccounted"]) == (2, 4, 0)
    assert out["stats"]["skipped"] == 2
    assert json.loads(gcs.blob("scored/dt=2024-05-31/_SUCCESS").download_as_text())["skipped"] == 2
    assert out["names"] == sorted([f"scored/dt=2024-05-31/{n}" for n in ["_SUCCESS"] +
                                   sum(out["record"]["files"].values(), [])])


def test_replace_if_on_gcs_writes_only_over_the_generation_it_read(gcs):
    from engines import storage

    path = f"gs://{BUCKET}/cas/_SUCCESS"
    assert storage.version_token(path) == storage.ABSENT
    storage.replace_if(path, b"first", storage.ABSENT)
    first = storage.version_token(path)
    assert first.startswith("gen:")
    with pytest.raises(storage.VersionMismatch) as caught:
        storage.replace_if(path, b"second", storage.ABSENT)  # created meanwhile by another writer
    assert caught.value.current == b"first"
    storage.replace_if(path, b"second", first)
    with pytest.raises(storage.VersionMismatch):
        storage.replace_if(path, b"third", first)  # a generation that is no longer live
    assert gcs.blob("cas/_SUCCESS").download_as_bytes() == b"second"


def test_two_runs_into_one_gcs_partition_at_once_exactly_one_commits(gcs, images, tmp_path):
    # The slow run was launched first and is held right before its swap of _SUCCESS (a test-only
    # hook, tests/commit_hooks.py); the fast run commits meanwhile. GCS's precondition decides.
    out = f"gs://{BUCKET}/race"
    _run(["--input", f"gs://{BUCKET}/images/*", "--output", out])
    gate = tmp_path / "gate"
    argv = [sys.executable, "-m", "tests.commit_hooks", "pause", str(gate), out, "--", "--input",
            f"gs://{BUCKET}/images/chelsea.jpg", "--output", out, "--batch_size", "4", "--progress_every_s", "0"]
    repo = Path(__file__).resolve().parent.parent
    slow = subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NO_GCE_CHECK": "true"})
    deadline = time.monotonic() + 300
    while not Path(str(gate) + ".waiting").exists():
        assert slow.poll() is None, slow.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the slow run never reached its commit"
        time.sleep(0.1)
    fast = _run(["--input", f"gs://{BUCKET}/images/coffee.jpg", "--output", out])
    gate.touch()
    _, err = slow.communicate(timeout=300)
    assert slow.returncode == 1, err[-3000:]
    assert f"committed by run {fast['run']['run_id']}" in err and "this run committed nothing" in err, err[-3000:]
    outputs = _read_outputs(gcs, "race")
    assert outputs["record"]["run_id"] == fast["run"]["run_id"]
    assert [r["uri"] for r in outputs["predictions"]] == [images["coffee.jpg"]]
