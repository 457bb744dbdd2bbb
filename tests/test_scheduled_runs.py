"""Scheduled offline scoring (docs/scheduling.md): date partitions, reruns that replace, a failed or killed run
that leaves the last good partition, --skip_scored, and retried bundles that lose and duplicate nothing.

Real photos, the real model and Beam's real runners: the BundleBasedDirectRunner retries a failed
bundle (up to 4 attempts, as Dataflow does in batch); the FnApiRunner (the DirectRunner's default
here) does not, so the fault-injection runs use the former. Faults come from ``tests/faults.py``, a
hook these tests install around a run; the production code has no switch for them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engines.base import UsageError
from pipelines import classify_images, partitions
from tests import faults
from tests.conftest import REPO, jpeg_bytes, photo

FAST = ["--batch_size", "4", "--progress_every_s", "0", "--decode_threads", "2"]


def _partition(out) -> dict:
    """{"success", "predictions", "dead", "scored", "names"} of a partition folder, read as a user
    would: through the files its _SUCCESS lists."""
    from transforms.commit import parse_record

    out = Path(out)
    success = parse_record((out / "_SUCCESS").read_bytes()) if (out / "_SUCCESS").exists() else None

    def rows(kind):
        return partitions.committed_rows(str(out), kind) if success else []

    return {"success": success, "names": sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()),
            "predictions": rows("predictions"), "dead": rows("dead_letter"), "scored": rows("scored")}


def _stats(out) -> dict:
    """The committed run's stats.json."""
    return json.loads((Path(partitions.committed_files(str(out), "stats")[0])).read_text())


def _snapshot(out) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}


def _assert_same_rows(got, want):
    """Same predictions (URI, classes, scores within 1e-5) and dead letters; no duplicates."""
    uris = [r["uri"] for r in got["predictions"]]
    assert len(uris) == len(set(uris)), "duplicate prediction rows"
    dead_uris = [r["uri"] for r in got["dead"]]
    assert len(dead_uris) == len(set(dead_uris)), "duplicate dead-letter rows"
    assert sorted(uris) == sorted(r["uri"] for r in want["predictions"]), "missing or extra predictions"
    by_uri = {r["uri"]: r for r in want["predictions"]}
    for row in got["predictions"]:
        ref = by_uri[row["uri"]]
        assert [p["class_id"] for p in row["top_k"]] == [p["class_id"] for p in ref["top_k"]], row["uri"]
        np.testing.assert_allclose([p["score"] for p in row["top_k"]], [p["score"] for p in ref["top_k"]],
                                   atol=1e-5, rtol=0)
    key = lambda r: (r["uri"], r["stage"], r["error"])  # noqa: E731
    assert sorted(map(key, got["dead"])) == sorted(map(key, want["dead"]))
    assert sorted(r["uri"] for r in got["scored"]) == sorted(r["uri"] for r in want["scored"])
    for name in ("inputs", "predictions", "dead_letters", "skipped", "unaccounted"):
        assert got["success"][name] == want["success"][name], name
    assert got["success"]["predictions"] == len(got["predictions"])
    assert got["success"]["dead_letters"] == len(got["dead"])


# --- date partitions -------------------------------------------------------------------------

def test_run_date_forms_and_placeholders():
    now = dt.datetime(2024, 3, 1, 0, 30, tzinfo=dt.timezone.utc)
    assert partitions.parse_run_date("2024-05-31") == dt.date(2024, 5, 31)
    assert partitions.parse_run_date(None, now) == dt.date(2024, 3, 1)
    assert partitions.parse_run_date("yesterday", now) == dt.date(2024, 2, 29)
    for bad in ("2024-02-30", "31/05/2024", "2024-5-31", "tomorrow"):
        with pytest.raises(UsageError, match=r"--run_date .* is not a date: use YYYY-MM-DD"):
            partitions.parse_run_date(bad)
    day = dt.date(2024, 5, 31)
    assert partitions.fill_placeholders("--input", "gs://b/photos/dt={date}/**", day) == "gs://b/photos/dt=2024-05-31/**"
    assert partitions.fill_placeholders("--output", "/x/{{literal}}/{date}", day) == "/x/{literal}/2024-05-31"
    with pytest.raises(UsageError, match=r"--output .* unknown placeholder \{day\}; the only placeholder is \{date\}"):
        partitions.fill_placeholders("--output", "/x/dt={day}", day)
    with pytest.raises(UsageError, match=r"--input .* is not a valid template"):
        partitions.fill_placeholders("--input", "/x/dt={date", day)


@pytest.mark.parametrize("flags,message", [
    (["--run_date", "2024-13-01"], r"--run_date '2024-13-01' is not a date"),
    (["--output", "OUT/dt={dat}"], r"--output .* unknown placeholder \{dat\}"),
])
def test_bad_date_or_placeholder_stops_at_start(corpus, tmp_path, flags, message):
    directory, _, _ = corpus
    argv = ["--input", directory, "--output", str(tmp_path / "o"), *flags]
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    with pytest.raises(UsageError, match=message):
        classify_images.run(argv)
    assert classify_images.main(argv) == 2
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("dt=*"))


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    """Two days of photos in photos/dt=YYYY-MM-DD/ folders (4 and 3 images, one broken each)."""
    root = tmp_path_factory.mktemp("days")
    layout = {"2024-05-30": ["chelsea", "coffee", "astronaut"], "2024-05-31": ["rocket", "camera"]}
    for day, names in layout.items():
        folder = root / "photos" / f"dt={day}"
        folder.mkdir(parents=True)
        for name in names:
            (folder / f"{name}.jpg").write_bytes(jpeg_bytes(photo(name) if photo(name).ndim == 3 else
                                                            np.stack([photo(name)] * 3, axis=-1)))
        (folder / "broken.jpg").write_bytes(b"not a jpeg\n")
    return root


def test_dated_run_fills_input_and_output_and_commits(days, model_path, tmp_path):
    out = tmp_path / "scored"
    stats = classify_images.run(["--input", str(days / "photos" / "dt={date}") + "/", "--output",
                                 str(out / "dt={date}"), "--run_date", "2024-05-31", *FAST])
    part = _partition(out / "dt=2024-05-31")
    assert sorted(os.path.basename(r["uri"]) for r in part["predictions"]) == ["camera.jpg", "rocket.jpg"]
    assert [os.path.basename(r["uri"]) for r in part["dead"]] == ["broken.jpg"]
    success = part["success"]
    assert success["run_date"] == "2024-05-31" and success["input"].endswith("dt=2024-05-31/")
    assert (success["inputs"], success["predictions"], success["dead_letters"], success["unaccounted"]) == (3, 2, 1, 0)
    assert dt.datetime.fromisoformat(success["start_time"]) <= dt.datetime.fromisoformat(success["end_time"])
    assert sorted(sum(success["files"].values(), [])) == sorted(n for n in part["names"] if n != "_SUCCESS")
    assert stats["run"]["run_id"] == success["run_id"] and stats["predictions"] == 2
    assert os.listdir(out) == ["dt=2024-05-31"]
    assert sorted(os.listdir(out / "dt=2024-05-31")) == ["_SUCCESS", success["run_folder"]]


def test_run_ids_sort_by_start_time_even_within_one_second():
    # The commit removes the staging folders of runs whose id sorts at or before its own (runs that
    # started earlier and died). A killed run and its rerun can start within one second; with ids of
    # whole seconds the random suffix decided the order half the time, the dead run's staging stayed,
    # and test_killed_run_then_rerun_equals_a_clean_run failed now and then.
    start = dt.datetime(2024, 5, 31, 1, 2, 3, 100_000, tzinfo=dt.timezone.utc)
    for step_us in (1, 1_000, 400_000):
        for _ in range(50):
            earlier = partitions.new_run_id(start)
            later = partitions.new_run_id(start + dt.timedelta(microseconds=step_us))
            assert earlier < later, (earlier, later)


# --- reruns replace; failed and killed runs keep the last good partition ----------------------

@pytest.fixture(scope="module")
def clean_bundle_run(corpus, model_path, tmp_path_factory):
    """A clean BundleBasedDirectRunner run over the corpus: the reference for fault-injection runs."""
    directory, _, _ = corpus
    out = tmp_path_factory.mktemp("clean") / "out"
    classify_images.run(["--input", directory, "--output", str(out), "--runner", "BundleBasedDirectRunner", *FAST])
    return _partition(out)


def test_rerun_replaces_every_stale_file_and_keeps_foreign_ones(corpus, model_path, clean_bundle_run, tmp_path):
    directory, good, broken = corpus
    out = tmp_path / "out"
    classify_images.run(["--input", directory, "--output", str(out), *FAST])
    first = _partition(out)
    # What an earlier run with other settings would have left: other shard counts, another format.
    (out / "predictions-00002-of-00003.jsonl").write_text(json.dumps({"uri": good[0], "top_k": []}) + "\n")
    (out / "dead_letter-00000-of-00002.jsonl").write_text(json.dumps({"uri": "x", "error": "old", "stage": "read"}) + "\n")
    (out / "predictions-00000-of-00001.parquet").write_bytes(b"PAR1")
    (out / "_scored-00003-of-00004.jsonl").write_text(json.dumps({"uri": good[0], "size": 1, "mtime": 1}) + "\n")
    (out / "NOTES.txt").write_text("the user's own file\n")
    (out / ".temp-predictions").mkdir()  # left by a run of an older version of this pipeline
    (out / "_staging" / "20000101T000000.000000Z-dead").mkdir(parents=True)  # an older version's staging
    (out / "stats.json.tmp-0123abcd").write_text("{")  # a stats write that died

    classify_images.run(["--input", directory, "--output", str(out), *FAST, "--direct_running_mode",
                         "multi_threading", "--direct_num_workers", "2"])

    second = _partition(out)
    assert second["success"]["run_id"] != first["success"]["run_id"]
    listed = sorted(sum(second["success"]["files"].values(), []))
    assert sorted(second["names"]) == sorted(listed + ["_SUCCESS", "NOTES.txt"])
    _assert_same_rows(second, clean_bundle_run)
    assert len(second["predictions"]) == len(good) and len(second["dead"]) == len(broken)
    stats = _stats(out)
    assert (stats["predictions"], stats["dead_letters"], stats["unaccounted"]) == (len(good), len(broken), 0)
    assert stats["run"]["run_id"] == second["success"]["run_id"]


def test_failed_run_leaves_the_last_good_partition_untouched(corpus, model_path, tmp_path):
    directory, _, _ = corpus
    out = tmp_path / "out"
    classify_images.run(["--input", directory, "--output", str(out), *FAST])
    before = _snapshot(out)
    markers = tmp_path / "faults"
    with faults.injected(f"decode:100:{markers}:always"), pytest.raises(Exception, match="injected decode fault"):
        classify_images.run(["--input", directory, "--output", str(out), "--runner", "BundleBasedDirectRunner",
                             *FAST])
    after = _snapshot(out)
    committed = {k: v for k, v in after.items() if k in before}
    assert committed == before  # byte for byte: no _SUCCESS of its own, no file changed
    assert faults.count_attempts(str(markers), "decode")[2] == 4  # Beam gave up after 4 attempts
    classify_images.run(["--input", directory, "--output", str(out), *FAST])
    part = _partition(out)
    assert sorted(part["names"]) == sorted(["_SUCCESS"] + sum(part["success"]["files"].values(), []))


def test_killed_run_then_rerun_equals_a_clean_run(corpus, model_path, clean_bundle_run, tmp_path):
    directory, _, _ = corpus
    out = tmp_path / "out"
    classify_images.run(["--input", directory, "--output", str(out), *FAST])
    before = _snapshot(out)
    # The process is SIGKILLed while it writes its staged rows, as a crashed or preempted launcher.
    argv = [sys.executable, "-m", "tests.faults", f"write:100:{tmp_path / 'faults'}:kill", "--", "--input", directory,
            "--output", str(out), *FAST]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    after = _snapshot(out)
    staged = [k for k in after if k not in before]
    assert staged, "the killed run wrote nothing before it died"
    assert {k: v for k, v in after.items() if k not in staged} == before
    classify_images.run(["--input", directory, "--output", str(out), *FAST])
    part = _partition(out)
    _assert_same_rows(part, clean_bundle_run)
    assert sorted(part["names"]) == sorted(["_SUCCESS"] + sum(part["success"]["files"].values(), []))


# --- retries lose nothing and duplicate nothing ----------------------------------------------

@pytest.mark.parametrize("stage", faults.STAGES)
def test_retried_bundles_commit_exactly_the_clean_output(corpus, model_path, clean_bundle_run, tmp_path, stage):
    directory, _, _ = corpus
    out, markers = tmp_path / "out", tmp_path / "faults"
    with faults.injected(f"{stage}:100:{markers}"):
        classify_images.run(["--input", directory, "--output", str(out), "--runner", "BundleBasedDirectRunner",
                             *FAST])
    bundles, failed, attempts = faults.count_attempts(str(markers), stage)
    assert failed >= 1 and failed / bundles >= 0.10 and attempts >= bundles + failed, (bundles, failed, attempts)
    got = _partition(out)
    _assert_same_rows(got, clean_bundle_run)
    print(f"fault stage={stage}: bundles={bundles} failed_first_attempt={failed} attempts={attempts} "
          f"committed predictions={got['success']['predictions']} dead_letters={got['success']['dead_letters']} "
          f"duplicates=0 missing=0")


def test_a_bad_fault_spec_is_refused_before_anything_is_patched(tmp_path):
    from transforms.images import ReadImageBatches

    process = ReadImageBatches.process
    for spec, message in (("x:10:/tmp", r"fault stage must be one of"), ("read:0:/tmp", r"fault percent must be 1-100"),
                          ("read:10", r"a fault spec is STAGE:PERCENT:DIR"), ("read:10:/tmp:often", r"a fault spec")):
        with pytest.raises(ValueError, match=message), faults.injected(spec):
            pass
        assert ReadImageBatches.process is process
    with faults.injected(f"read:100:{tmp_path}"):
        assert ReadImageBatches.process is not process
    assert ReadImageBatches.process is process  # undone on exit: later runs in this process are clean


# --- new files only --------------------------------------------------------------------------

def test_skip_scored_scores_new_and_changed_files_only(model_path, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for name in ("chelsea", "coffee", "astronaut"):
        (incoming / f"{name}.jpg").write_bytes(jpeg_bytes(photo(name)))
    (incoming / "broken.jpg").write_bytes(b"text, not a JPEG\n")
    (incoming / "missing.jpg").symlink_to(incoming / "gone.jpg")  # a read error: tried again next day
    scored = tmp_path / "scored"
    day = ["--input", str(incoming) + "/", "--output", str(scored / "dt={date}"), *FAST,
           "--skip_scored", str(scored)]
    first = classify_images.run(day + ["--run_date", "2024-05-30"])
    assert (first["predictions"], first["dead_letters"], first["skipped"]) == (3, 2, 0)

    (incoming / "rocket.jpg").write_bytes(jpeg_bytes(photo("rocket")))  # new
    time.sleep(0.01)
    (incoming / "coffee.jpg").write_bytes(jpeg_bytes(photo("coffee"), quality=70))  # changed
    second = classify_images.run(day + ["--run_date", "2024-05-31"])
    part = _partition(scored / "dt=2024-05-31")
    assert sorted(os.path.basename(r["uri"]) for r in part["predictions"]) == ["coffee.jpg", "rocket.jpg"]
    assert [os.path.basename(r["uri"]) for r in part["dead"]] == ["missing.jpg"]
    assert (second["skipped"], second["inputs"], second["unaccounted"]) == (3, 6, 0)  # chelsea, astronaut, broken
    assert part["success"]["skipped"] == 3
    assert _stats(scored / "dt=2024-05-31")["skipped"] == 3

    # A rerun of a day replaces it: its own earlier partition does not count as scored.
    rerun = classify_images.run(day + ["--run_date", "2024-05-31"])
    assert (rerun["predictions"], rerun["skipped"]) == (2, 3)
    assert len(_partition(scored / "dt=2024-05-31")["predictions"]) == 2
    # The first day is untouched by the later runs.
    assert len(_partition(scored / "dt=2024-05-30")["predictions"]) == 3


def _most_elements_in_any_pcollection(argv):
    """Runs the CLI's pipeline (build_pipeline, commit included) and returns the largest element count of
    any of its PCollections but the commit's flattened counts, and that of the counts, from the runner's
    element-count monitoring infos."""
    import apache_beam as beam
    from apache_beam.metrics import monitoring_infos

    from pipelines.settings import resolve

    settings, options = resolve(list(argv) + ["--decode", "cpu"])
    pipeline = beam.Pipeline(options=options)
    classify_images.build_pipeline(pipeline, settings)
    result = pipeline.run()
    result.wait_until_finish()
    names = {key: value.unique_name for key, value in pipeline.to_runner_api().components.pcollections.items()}
    counts = [(names.get(info.labels["PCOLLECTION"], info.labels["PCOLLECTION"]),
               monitoring_infos.extract_counter_value(info)) for info in result.monitoring_infos()
              if info.urn == monitoring_infos.ELEMENT_COUNT_URN]
    assert counts, "the runner reported no element counts"
    commit_counts = [n for name, n in counts if "CommitPartition/AllCounts" in name]
    assert commit_counts, f"no CommitPartition/AllCounts among {sorted(name for name, _ in counts)}"
    return max(n for name, n in counts if "CommitPartition/AllCounts" not in name), max(commit_counts)


def test_skip_check_and_commit_keep_to_batches_not_images(model_path, tmp_path):
    # Every per-image Beam element is off the path (Beam alone tops out near 4,300 elements/s on
    # the H100 host); the skip check, the scored records and the commit's counts must not bring
    # them back: every PCollection holds batches, blocks or counts.
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    sources = [photo(n) for n in ("chelsea", "coffee", "astronaut", "rocket")]
    for i in range(36):
        src = sources[i % len(sources)]
        (incoming / f"img_{i:02d}.jpg").write_bytes(jpeg_bytes(np.ascontiguousarray(src[i:i + 96, i:i + 96])))
        if i == 23:  # the first day sees 24 images, the second 12 more
            argv = ["--input", str(incoming) + "/", "--output", str(tmp_path / "s" / "{date}"), "--batch_size", "8",
                    "--progress_every_s", "0", "--decode_threads", "2", "--skip_scored", str(tmp_path / "s")]
            # 3 batches of refs, and the commit's counts: a number per batch for inputs and predictions
            most, counts = _most_elements_in_any_pcollection(argv + ["--run_date", "2024-05-30"])
            assert most <= 3 and counts <= 2 * 3 + 1, (most, counts)
    most, counts = _most_elements_in_any_pcollection(argv + ["--run_date", "2024-05-31"])
    part = _partition(tmp_path / "s" / "2024-05-31")
    assert (part["success"]["inputs"], part["success"]["skipped"], part["success"]["predictions"]) == (36, 24, 12)
    assert len(part["predictions"]) == 12 and len(part["scored"]) == 12
    # 5 batches of refs (36 / 8); the counts: a number per batch for inputs and skipped, per block scored
    assert most <= 5, f"a PCollection carried {most} elements for 5 batches of refs: one per image?"
    assert counts <= 3 * 5, f"the commit's counts carried {counts} numbers for 5 batches: one per image?"


def test_summary_line_names_the_skipped_count(model_path, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "chelsea.jpg").write_bytes(jpeg_bytes(photo("chelsea")))
    argv = ["--input", str(src) + "/", "--output", str(tmp_path / "s" / "{date}"), *FAST, "--skip_scored",
            str(tmp_path / "s")]
    assert classify_images.main(argv + ["--run_date", "2024-01-01"]) == 0
    assert classify_images.main(argv + ["--run_date", "2024-01-02"]) == 0
    assert "scored 0 images, 0 dead letters, 1 skipped as already scored" in capsys.readouterr().out


# --- the Fn API path Dataflow Runner v2 uses, with SDK workers in other processes ------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"a Beam service exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listened on port {port} within {timeout} s")


def test_portable_runner_with_external_sdk_workers_on_the_demo(model_path, tmp_path):
    from pipelines import demo

    images = tmp_path / "demo_images"
    images.mkdir()
    inputs = demo.write_photos(str(images)) + demo.write_broken(str(images))
    manifest = images / "manifest.txt"
    manifest.write_text("\n".join(inputs) + "\n")
    # The worker pool starts each SDK worker as `python -c ...`: it must be this interpreter, in this repo.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": str(REPO)}
    job_port, pool_port = _free_port(), _free_port()
    services = [subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                                 stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.log", "wb"))
                for name, module, args in (
                    ("job_service", "apache_beam.runners.portability.local_job_service_main", ["--port", str(job_port)]),
                    ("worker_pool", "apache_beam.runners.worker.worker_pool_main", ["--service_port", str(pool_port)]))]
    try:
        _wait_port(job_port, services[0])
        _wait_port(pool_port, services[1])
        out = tmp_path / "out"
        argv = [sys.executable, "-m", "pipelines.classify_images", "--input", str(manifest), "--output", str(out),
                "--runner", "PortableRunner", "--job_endpoint", f"localhost:{job_port}", "--environment_type",
                "EXTERNAL", "--environment_config", f"localhost:{pool_port}", *FAST]
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    finally:
        for service in services:
            service.terminate()
            service.wait(timeout=30)
    part = _partition(out)
    assert len(part["predictions"]) == 11 and len(part["dead"]) == 6
    success = part["success"]
    assert (success["inputs"], success["predictions"], success["dead_letters"], success["unaccounted"]) == (17, 11, 6, 0)
    stats = _stats(out)
    assert (stats["inputs"], stats["predictions"], stats["dead_letters"], stats["unaccounted"]) == (17, 11, 6, 0)
    assert stats["run"]["run_id"] == success["run_id"]
    assert (out / success["run_folder"] / "stats.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(part["names"]) == sorted(["_SUCCESS"] + sum(success["files"].values(), []))
    assert "scored 11 images, 6 dead letters, 0 skipped" in proc.stdout
