"""transforms/commit.py and engines.storage's compare-and-swap: a committed partition is never mixed,
emptied or lost.

The properties, checked with the real CLI, the real model and real files:
(a) a reader who follows ``_SUCCESS`` sees the previous run or the new one, whole, at every instant,
    also after kill -9 at any point of the writes and the commit, and after a full disk;
(b) the previous run's files are removed only after the new ``_SUCCESS`` is in place;
(c) two runs into one ``--output`` at once: exactly one commits, the other fails naming it;
(d) paths are compared as canonical paths;
(e) glob characters in ``--output`` are literal.
The kill and disk-full points come from ``tests/commit_hooks.py``, a wrapper outside the production
code that counts the job's filesystem changes under the output folder. The last section runs the
commit step alone (``CommitPartition`` on Beam's ``TestPipeline``, files staged in ``tmp_path``): its
record, its clean-up, a retried commit, and what a conflict says about who wrote ``_SUCCESS``.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engines import storage
from pipelines import classify_images, partitions
from tests.conftest import REPO, jpeg_bytes, photo
from transforms.commit import parse_record

FAST = ["--batch_size", "2", "--progress_every_s", "0", "--decode_threads", "2"]


def _photos(folder: Path, names, broken: bool = False) -> str:
    folder.mkdir(parents=True)
    for name in names:
        image = photo(name)
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(image if image.ndim == 3 else np.stack([image] * 3, -1)))
    if broken:
        (folder / "broken.jpg").write_bytes(b"not a jpeg\n")
    return str(folder) + "/"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two inputs whose rows differ: "old" (2 photos + a broken file) and "new" (3 other photos)."""
    root = tmp_path_factory.mktemp("commit-inputs")
    return {"old": _photos(root / "old", ["chelsea", "coffee"], broken=True),
            "new": _photos(root / "new", ["astronaut", "rocket", "camera"])}


def _state(out: Path):
    """(record, {listed path: bytes}) of the partition as a reader sees it, or (None, {})."""
    success = out / "_SUCCESS"
    record = parse_record(success.read_bytes()) if success.exists() else None
    if record is None:
        return None, {}
    return record, {name: (out / name).read_bytes() for name in sum(record["files"].values(), [])}


def _assert_whole(out: Path, allowed: dict):
    """Property (a): _SUCCESS names a run in ``allowed`` ({run_id or input: files or None}) and
    every file it lists is there, whole: rows add up to its counts, the URIs are that input's."""
    record, files = _state(out)
    assert record is not None, f"no readable _SUCCESS in {out}: {sorted(os.listdir(out))}"
    assert record["run_id"] in allowed or record["input"] in allowed, record["run_id"]
    expected = allowed.get(record["run_id"])
    if expected is not None:  # a run seen before: byte for byte what it committed
        assert files == expected, "the committed files of the previous run changed"
    rows = partitions.committed_rows(str(out), "predictions")
    dead = partitions.committed_rows(str(out), "dead_letter")
    assert (len(rows), len(dead)) == (record["predictions"], record["dead_letters"]), record
    uris = sorted(r["uri"] for r in rows + dead)
    assert uris == sorted(str(p) for p in Path(record["input"]).iterdir()), uris
    assert record["unaccounted"] == 0
    return record, files


def _assert_clean(out: Path):
    """Nothing but _SUCCESS and the files it lists: no leftover run folder, temp or staging file."""
    record, files = _state(out)
    present = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert present == sorted(["_SUCCESS", *files]), present


def _hooked(*hook, out: Path, input_dir: str, timeout: int = 300, extra=()):
    argv = [sys.executable, "-m", "tests.commit_hooks", *hook, str(out), "--", "--input", input_dir, "--output",
            str(out), *FAST, *extra]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _commit_old(out: Path, inputs) -> dict:
    classify_images.run(["--input", inputs["old"], "--output", str(out), *FAST])
    record, files = _state(out)
    return {record["run_id"]: files}


def _changes(seed: Path, scratch: Path, input_dir: str):
    """What a run over a copy of ``seed`` changes, in order (tests/commit_hooks.py's count mode)."""
    shutil.copytree(seed, scratch)
    argv = [sys.executable, "-m", "tests.commit_hooks", "count", str(scratch), "--", "--input", input_dir, "--output",
            str(scratch), *FAST]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COMMIT_HOOKS_LIST": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    changes = [line.split(": ", 2)[2] for line in proc.stderr.splitlines() if line.startswith("commit_hooks: change ")]
    assert len(changes) == int(proc.stdout.rsplit("mutations", 1)[1].split()[0])
    shutil.rmtree(scratch)
    return changes


def test_kill_9_at_any_point_of_writes_and_commit_keeps_a_whole_partition(inputs, model_path, tmp_path):
    seed = tmp_path / "seed"
    committed = _commit_old(seed, inputs)
    changes = _changes(seed, tmp_path / "count", inputs["new"])
    swap = next(i for i, what in enumerate(changes, 1) if what.startswith("replace") and what.endswith("/_SUCCESS')"))
    # Every other change while rows are written and moved into the run folder; every change from
    # the run's stats files to the first removal after the swap of _SUCCESS; a few of the clean-up.
    first_stats = next(i for i, what in enumerate(changes, 1) if "stats.json.tmp-" in what)
    points = sorted(set(range(1, first_stats, 2)) | set(range(first_stats, swap + 3))
                    | set(range(swap + 3, len(changes) + 1, 4)))
    assert len(points) >= 20, (points, changes)

    def one(k):
        out = tmp_path / f"kill-{k}"
        shutil.copytree(seed, out)
        killed = _hooked("kill", str(k), out=out, input_dir=inputs["new"])
        where = killed.stderr.split("commit_hooks: SIGKILL at change", 1)[-1].split("\n", 1)[0]
        assert killed.returncode == -9, (k, killed.stderr[-2000:])
        record, _ = _assert_whole(out, {**committed, inputs["new"]: None})
        if record["input"] == inputs["old"]:  # property (b): the previous run is intact until replaced
            assert _state(out)[1] == committed[record["run_id"]]
        rerun = _hooked("count", out=out, input_dir=inputs["new"])
        assert rerun.returncode == 0, (k, rerun.stderr[-2000:])
        after, _ = _assert_whole(out, {inputs["new"]: None})
        assert after["input"] == inputs["new"]
        _assert_clean(out)
        shutil.rmtree(out)
        return k, where.strip(), record["input"] == inputs["new"]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, points))
    kinds = " | ".join(where for _, where, _ in results)
    print(f"\n{len(results)} kill points of {len(changes)} changes; committed when killed: "
          f"{[k for k, _, new in results if new]}")
    # The points reached every phase: rows, the run folder, stats, _SUCCESS, the clean-up.
    for phase in ("predictions-", "stats.json", "_SUCCESS.tmp-", "replace", "rmtree"):
        assert phase in kinds, (phase, kinds)
    assert any(new for _, _, new in results) and not all(new for _, _, new in results)


def test_full_disk_during_writes_or_commit_fails_and_keeps_the_previous_partition(inputs, model_path, tmp_path):
    seed = tmp_path / "seed"
    committed = _commit_old(seed, inputs)
    changes = _changes(seed, tmp_path / "count", inputs["new"])
    rows = next(i for i, what in enumerate(changes, 1) if what.startswith("open") and ".temp-predictions" in what)
    stats = next(i for i, what in enumerate(changes, 1) if "stats.json.tmp-" in what)
    swap = next(i for i, what in enumerate(changes, 1) if what.startswith("open") and "_SUCCESS.tmp-" in what)
    for k in (rows, stats, swap):
        out = tmp_path / f"full-{k}"
        shutil.copytree(seed, out)
        proc = _hooked("full", str(k), out=out, input_dir=inputs["new"])
        assert proc.returncode == 1, (k, changes[k - 1], proc.stderr[-3000:])
        assert "No space left on device" in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr.split("\nerror:", 1)[-1], proc.stderr[-3000:]
        _assert_whole(out, committed)
        assert classify_images.main(["--input", inputs["new"], "--output", str(out), *FAST]) == 0
        _assert_whole(out, {inputs["new"]: None})
        _assert_clean(out)


def _start_paused(out: Path, input_dir: str, gate: Path, extra=(), env=None):
    argv = [sys.executable, "-m", "tests.commit_hooks", "pause", str(gate), str(out), "--", "--input", input_dir,
            "--output", str(out), *FAST, *extra]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not Path(str(gate) + ".waiting").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the paused run never reached its commit"
        time.sleep(0.1)
    return proc


def test_two_runs_at_once_exactly_one_commits_and_the_other_names_it(inputs, model_path, tmp_path):
    out = tmp_path / "out"
    _commit_old(out, inputs)
    gate = tmp_path / "gate"
    slow = _start_paused(out, inputs["new"], gate)  # launched first, held at the swap of _SUCCESS
    fast = classify_images.run(["--input", inputs["old"], "--output", str(out), *FAST])
    gate.touch()
    _, err = slow.communicate(timeout=300)
    assert slow.returncode == 1, err[-3000:]
    assert f"committed by run {fast['run']['run_id']}" in err and "this run committed nothing" in err, err[-2000:]
    record, _ = _assert_whole(out, {fast["run"]["run_id"]: None})
    assert record["run_id"] == fast["run"]["run_id"]
    # The loser's folder, if it is still there, goes with the next commit.
    classify_images.run(["--input", inputs["old"], "--output", str(out), *FAST])
    _assert_clean(out)


def test_a_run_whose_folder_vanishes_mid_write_names_the_run_that_committed(inputs, model_path, tmp_path):
    # The slow run is held at its first write; the fast run commits and removes the folders of runs
    # that sort before it (the slow one's among them). The slow run then fails on its writes:
    # its error must still say what happened.
    out = tmp_path / "out"
    _commit_old(out, inputs)
    fast_done = tmp_path / "fast-done"
    argv = [sys.executable, "-c", (
        "import os, sys, time, builtins\n"
        "from engines import storage\n"
        "real = storage.fsync_file\n"
        "def held(path):\n"
        f"    while not os.path.exists({str(fast_done)!r}): time.sleep(0.05)\n"
        "    return real(path)\n"
        "storage.fsync_file = held\n"
        f"open({str(fast_done) + '.waiting'!r}, 'w').close()\n"
        "from pipelines import classify_images\n"
        "sys.exit(classify_images.main(sys.argv[1:]))\n"),
        "--input", inputs["new"], "--output", str(out), *FAST]
    slow = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not Path(str(fast_done) + ".waiting").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # the slow run has read its base version and is launching
    fast = classify_images.run(["--input", inputs["old"], "--output", str(out), *FAST])
    fast_done.touch()
    _, err = slow.communicate(timeout=300)
    assert slow.returncode == 1, err[-3000:]
    assert f"committed by run {fast['run']['run_id']}" in err, err[-3000:]
    assert _state(out)[0]["run_id"] == fast["run"]["run_id"]


def test_same_partition_spelled_differently_is_replaced_not_skipped(inputs, model_path, tmp_path, monkeypatch):
    # --skip_scored must never count the partition being replaced, however --output is spelled.
    root = tmp_path / "scored"
    day = root / "dt=2024-05-31"
    first = classify_images.run(["--input", inputs["new"], "--output", str(day), *FAST, "--skip_scored", str(root)])
    assert first["predictions"] == 3
    (tmp_path / "link").symlink_to(root)
    monkeypatch.chdir(tmp_path)
    for spelling in ("./scored/dt=2024-05-31", "scored//dt=2024-05-31/", str(tmp_path / "link" / "dt=2024-05-31"),
                     str(tmp_path / "scored" / "x" / ".." / "dt=2024-05-31")):
        again = classify_images.run(["--input", inputs["new"], "--output", spelling, *FAST, "--skip_scored",
                                     "./scored/"])
        assert (again["predictions"], again["skipped"]) == (3, 0), spelling
        assert len(partitions.committed_rows(str(day), "predictions")) == 3, spelling
    assert sorted(os.listdir(root)) == ["dt=2024-05-31"]


def test_glob_characters_in_output_are_literal(inputs, model_path, tmp_path):
    root = tmp_path / "parts"
    sibling = root / "d1"
    classify_images.run(["--input", inputs["old"], "--output", str(sibling), *FAST])
    before = _state(sibling)
    for name in ("d?", "d*", "d[1]"):
        out = root / name
        for _ in range(2):  # a first run and a rerun that replaces it
            assert classify_images.main(["--input", inputs["new"], "--output", str(out), *FAST]) == 0
        _assert_whole(out, {inputs["new"]: None})
        _assert_clean(out)
        assert _state(sibling) == before, name  # the partition the glob would have matched is untouched


def test_damaged_success_in_output_is_replaced_by_a_rerun(inputs, model_path, tmp_path):
    for damage in (b"", b'{"run_id": "2024', b"\x00\x01garbage", b"[]", b'{"run_id": 1, "files": {}}'):
        out = tmp_path / f"out-{len(damage)}-{damage[:2].hex()}"
        _commit_old(out, inputs)
        (out / "_SUCCESS").write_bytes(damage)
        assert classify_images.main(["--input", inputs["new"], "--output", str(out), *FAST]) == 0, damage
        _assert_whole(out, {inputs["new"]: None})
        _assert_clean(out)


def test_leftovers_of_dead_runs_and_older_versions_go_with_the_next_commit(inputs, model_path, tmp_path):
    out = tmp_path / "out"
    _commit_old(out, inputs)
    (out / "run-20000101T000000.000000Z-deadbeef" / ".temp-predictions").mkdir(parents=True)
    (out / "run-20000101T000000.000000Z-deadbeef" / "predictions-00000-of-00001.jsonl").write_text("{}\n")
    (out / "_staging").write_text("a file where an older version kept its staging folder")
    (out / "stats.json.tmp-0123abcd").write_text("{")
    (out / "_SUCCESS.tmp-89abcdef").write_text("{")
    (out / "predictions-00000-of-00003.jsonl").write_text('{"uri": "old"}\n')
    (out / ".temp-dead_letter").mkdir()
    (out / "NOTES.txt").write_text("the user's own file\n")
    assert classify_images.main(["--input", inputs["new"], "--output", str(out), *FAST]) == 0
    record, files = _assert_whole(out, {inputs["new"]: None})
    present = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert present == sorted(["_SUCCESS", "NOTES.txt", *files])


# --- the compare-and-swap itself --------------------------------------------------------------

def test_replace_if_writes_only_over_the_expected_version(tmp_path):
    path = str(tmp_path / "_SUCCESS")
    token = storage.version_token(path)
    assert token == storage.ABSENT
    storage.replace_if(path, b"one", token)
    with pytest.raises(storage.VersionMismatch) as caught:
        storage.replace_if(path, b"two", storage.ABSENT)  # someone else wrote it meanwhile
    assert caught.value.current == b"one"
    storage.replace_if(path, b"two", storage.version_token(path))
    assert Path(path).read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["_SUCCESS"]  # no lock or temporary file left


def test_replace_if_under_many_writers_lets_exactly_one_win(tmp_path):
    path = str(tmp_path / "_SUCCESS")
    storage.replace_if(path, b"base", storage.ABSENT)
    base = storage.version_token(path)
    script = ("import sys\nfrom engines import storage\ntry:\n    storage.replace_if(sys.argv[1], sys.argv[2].encode(), "
              "sys.argv[3])\n    print('won')\nexcept storage.VersionMismatch:\n    print('lost')\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, path, f"writer-{i}", base], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for i in range(8)]
    results = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert results.count("won") == 1, results
    winner = results.index("won")
    assert Path(path).read_bytes() == f"writer-{winner}".encode()


def test_canonical_spellings():
    here = os.getcwd()
    assert storage.canonical("a//b/./c/") == os.path.join(here, "a", "b", "c")
    assert storage.canonical("GS://bucket/dt=1/") == "gs://bucket/dt=1"
    assert storage.canonical("gs://bucket/a//b") == "gs://bucket/a//b"  # object names may hold //


def test_skip_scored_check_is_linear_in_the_records_of_one_uri():
    # A manifest listing one file 40,000 times used to cost O(records) per check: minutes.
    from transforms.scored import _CheckBatch
    from transforms.images import ImageRef

    check = _CheckBatch(True)
    check.setup()
    uri = "/data/one.jpg"
    prior = [{storage.canonical(uri): [[n, n] for n in range(40_000)]}]  # (size, mtime in ms)
    refs = [ImageRef(uri) for _ in range(40_000)]
    spelled = storage.canonical(uri)
    check._checked = lambda uris: [({"size": 7, "mtime": 0.007}, spelled)] * len(uris)
    start = time.perf_counter()
    out = list(check.process(refs, prior))
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"{elapsed:.1f} s for 40,000 checks against 40,000 records of one URI"
    assert [o.value for o in out if getattr(o, "tag", None) == "skipped"] == [40_000]


# --- the commit step alone: CommitPartition on Beam's TestPipeline, real files in tmp_path -----

RUN_ID = "20240531T010203.000000Z-0000aaaa"


def _plan(out: Path, run_id: str = RUN_ID, **kwargs):
    """A plan as the launcher makes it: ``base`` is the version of ``_SUCCESS`` read now."""
    from transforms.commit import CommitPlan

    kwargs.setdefault("base", storage.version_token(str(out / "_SUCCESS")))
    return CommitPlan(output=str(out), run_id=run_id, run_date="2024-05-31", input="/photos/",
                      start_time="2024-05-31T01:02:03+00:00", **kwargs)


def _stage(plan, names=("predictions-00000-of-00001.jsonl", "dead_letter-00000-of-00001.jsonl",
                        "_scored-00000-of-00001.jsonl")):
    """Writes the run's files into its folder, as the sinks would, and returns their FileResults."""
    from apache_beam.io import fileio

    folder = Path(plan.run_folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(f'{{"file": "{name}"}}\n')
    return [fileio.FileResult(str(folder / name), 0, 1, None, None, None) for name in names]


def _run_commit(plan, written, counts=None, check=None):
    """Runs CommitPartition over ``written`` (FileResults) and ``counts`` ({name: [numbers]})."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that

    from transforms.commit import COUNTS, CommitPartition

    counts = {**{name: [] for name in COUNTS}, **(counts or {})}
    with TestPipeline() as p:
        inputs = {"written": p | "Written" >> beam.Create(written)}
        for name in COUNTS:
            inputs[name] = p | f"Count_{name}" >> beam.Create(counts[name], reshuffle=False)
        committed = inputs | CommitPartition(plan)
        if check is not None:
            assert_that(committed, check)


def _record_of(run_id: str, input_dir: str = "/other/") -> bytes:
    import json

    return json.dumps({"run_id": run_id, "start_time": "2024-05-31T00:59:00+00:00", "input": input_dir,
                       "files": {"predictions": []}}).encode()


def test_conflict_with_a_foreign_success_names_the_writer_not_a_deletion(tmp_path):
    # Another tool wrote _SUCCESS (not a record of this pipeline) after this run was launched.
    out = tmp_path / "out"
    out.mkdir()
    plan = _plan(out)
    written = _stage(plan)
    (out / "_SUCCESS").write_bytes(b"written by another tool\n")
    with pytest.raises(Exception, match="a writer whose _SUCCESS is not a record of this pipeline") as caught:
        _run_commit(plan, written)
    assert "deleted" not in str(caught.value)
    assert (out / "_SUCCESS").read_bytes() == b"written by another tool\n"


def test_conflict_found_by_the_launcher_names_the_foreign_writer_not_a_deletion(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    plan = _plan(out)
    (out / "_SUCCESS").write_bytes(b"\x00 not json")
    conflict = partitions.concurrent_commit(plan)
    assert conflict is not None
    assert "a writer whose _SUCCESS is not a record of this pipeline" in str(conflict)
    assert "deleted" not in str(conflict)


class _WriteSuccessMeanwhile:
    """A ``write_stats`` that, as another writer would between the commit's check and its swap,
    replaces ``_SUCCESS`` with ``data``."""

    def __init__(self, success: str, data: bytes):
        self.success, self.data = success, data

    def __call__(self, folder, summary):
        Path(self.success).write_bytes(self.data)


@pytest.mark.parametrize("data,who", [
    (b"another tool's marker\n", "a writer whose _SUCCESS is not a record of this pipeline"),
    (_record_of("20240531T005900.000000Z-0000bbbb"), "run 20240531T005900.000000Z-0000bbbb (launched "
                                                     "2024-05-31T00:59:00+00:00, input /other/)"),
])
def test_conflict_at_the_swap_names_who_wrote_success_meanwhile(tmp_path, data, who):
    out = tmp_path / "out"
    out.mkdir()
    plan = _plan(out, write_stats=_WriteSuccessMeanwhile(str(out / "_SUCCESS"), data))
    written = _stage(plan)
    with pytest.raises(Exception, match=re.escape(f"was committed by {who} while this run ({RUN_ID})")):
        _run_commit(plan, written)
    assert (out / "_SUCCESS").read_bytes() == data


def test_conflict_says_deleted_only_when_success_is_gone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_SUCCESS").write_bytes(_record_of("20240530T000000.000000Z-0000cccc"))
    plan = _plan(out)  # launched over that record
    written = _stage(plan)
    (out / "_SUCCESS").unlink()
    with pytest.raises(Exception, match="was committed by someone who deleted its _SUCCESS while this run"):
        _run_commit(plan, written)
    assert "deleted its _SUCCESS" in str(partitions.concurrent_commit(plan))
    assert not (out / "_SUCCESS").exists()


def _committed_run(out: Path, run_id: str) -> dict:
    """A partition committed by ``run_id`` with one predictions file, as that run left it."""
    import json

    folder = out / f"run-{run_id}"
    folder.mkdir(parents=True)
    (folder / "predictions-00000-of-00001.jsonl").write_text('{"uri": "old"}\n')
    record = {"run_id": run_id, "start_time": "2024-05-30T00:00:00+00:00", "input": "/old/",
              "files": {"predictions": [f"run-{run_id}/predictions-00000-of-00001.jsonl"]}}
    (out / "_SUCCESS").write_text(json.dumps(record))
    return record


class _StatsFiles:
    """A ``write_stats`` that writes stats.json (the summary it is given) and a stand-in stats.png."""

    def __call__(self, folder, summary):
        import json

        Path(folder, "stats.json").write_text(json.dumps(summary))
        Path(folder, "stats.png").write_bytes(b"\x89PNG")


def test_commit_swaps_in_a_record_of_its_counts_and_files_then_removes_what_it_replaced(tmp_path):
    from apache_beam.testing.util import equal_to

    out = tmp_path / "out"
    old = _committed_run(out, "20240530T000000.000000Z-0000dead")
    later = out / "run-20240601T000000.000000Z-0000beef"  # a run launched after this one: still writing
    later.mkdir()
    (out / "NOTES.txt").write_text("the user's own file\n")
    plan = _plan(out, replaces=old["run_id"], write_stats=_StatsFiles())
    written = _stage(plan)
    (Path(plan.run_folder) / ".temp-predictions").mkdir()  # fileio's temporary folder

    def check(records):
        (record,) = records
        want = {"run_id": RUN_ID, "input": "/photos/", "inputs": 7, "predictions": 5, "dead_letters": 1,
                "skipped": 0, "unaccounted": 1, "run_folder": f"run-{RUN_ID}",
                "replaced": {"run_id": old["run_id"], "files": old["files"]["predictions"]},
                "files": {"predictions": [f"run-{RUN_ID}/predictions-00000-of-00001.jsonl"],
                          "dead_letter": [f"run-{RUN_ID}/dead_letter-00000-of-00001.jsonl"],
                          "scored": [f"run-{RUN_ID}/_scored-00000-of-00001.jsonl"],
                          "stats": [f"run-{RUN_ID}/stats.json", f"run-{RUN_ID}/stats.png"]}}
        equal_to([want])([{name: record[name] for name in want}])

    _run_commit(plan, written, {"inputs": [4, 2, 1], "predictions": [3, 2], "dead_letters": [1]}, check)
    record = parse_record((out / "_SUCCESS").read_bytes())
    assert record["run_id"] == RUN_ID and record["unaccounted"] == 1
    assert (Path(plan.run_folder) / "stats.json").exists()
    # The replaced run and fileio's temporary folder went; a later run's folder and the user's file stay.
    assert sorted(os.listdir(out)) == sorted(["_SUCCESS", f"run-{RUN_ID}", later.name, "NOTES.txt"])
    assert sorted(os.listdir(plan.run_folder)) == sorted([*(p.name for p in map(Path, (w.file_name for w in written))),
                                                          "stats.json", "stats.png"])


def test_commit_of_files_that_vanished_fails_and_commits_nothing(tmp_path):
    out = tmp_path / "out"
    old = _committed_run(out, "20240530T000000.000000Z-0000dead")
    before = (out / "_SUCCESS").read_bytes()
    plan = _plan(out, replaces=old["run_id"])
    written = _stage(plan)
    (Path(plan.run_folder) / "dead_letter-00000-of-00001.jsonl").unlink()  # e.g. removed by another run's commit
    with pytest.raises(Exception, match=r"dead_letter-00000-of-00001.jsonl and 0 other file\(s\) this run wrote are "
                                        r"gone: .* Nothing was committed"):
        _run_commit(plan, written)
    assert (out / "_SUCCESS").read_bytes() == before
    assert (out / f"run-{old['run_id']}" / "predictions-00000-of-00001.jsonl").exists()


def test_a_retried_commit_finds_its_own_record_and_only_cleans_up(tmp_path):
    import json

    from apache_beam.testing.util import equal_to

    out = tmp_path / "out"
    out.mkdir()
    plan = _plan(out, base=storage.ABSENT)
    written = _stage(plan)
    record = {"run_id": RUN_ID, "input": "/photos/", "predictions": 2,
              "files": {"predictions": [f"run-{RUN_ID}/predictions-00000-of-00001.jsonl"]},
              "replaced": {"run_id": "20240530T000000.000000Z-0000dead", "files": []}}
    (out / "_SUCCESS").write_text(json.dumps(record))  # the first attempt committed, then its worker died
    (out / "run-20240530T000000.000000Z-0000dead").mkdir()  # what that commit replaced
    earlier = out / "run-20240531T000000.000000Z-0000cafe"  # another run's folder, sorting earlier
    earlier.mkdir()
    before = (out / "_SUCCESS").read_bytes()
    _run_commit(plan, written, {"inputs": [9], "predictions": [9]}, check=equal_to([record]))
    assert (out / "_SUCCESS").read_bytes() == before  # not rewritten with the retry's counts
    # A retry may come minutes later, when another run may be writing: only the replaced run's folder goes.
    assert sorted(os.listdir(out)) == sorted(["_SUCCESS", f"run-{RUN_ID}", earlier.name])


def test_clean_partition_keeps_later_runs_and_foreign_files(tmp_path):
    from transforms.commit import clean_partition

    out = tmp_path / "out"
    names = {"run-20240530T000000.000000Z-0000aaaa": "dir", "run-20240531T010203.000000Z-0000aaaa": "dir",
             "run-20240601T000000.000000Z-0000bbbb": "dir", "run-20240529T000000.000000Z-0000cccc": "dir",
             "run-20240602T000000.000000Z-0000dddd": "dir",
             "_staging": "dir", ".temp-predictions": "dir", "predictions-00000-of-00001.jsonl": "file",
             "stats.json.tmp-0123abcd": "file", "_SUCCESS": "file", "NOTES.txt": "file", "predictions.csv": "file"}
    out.mkdir()
    for name, kind in names.items():
        (out / name).mkdir() if kind == "dir" else (out / name).write_text("x")
    (out / f"run-{RUN_ID}" / ".temp-dead_letter").mkdir(parents=True, exist_ok=True)
    (out / f"run-{RUN_ID}" / "stats.png.tmp-89abcdef").write_text("x")
    (out / f"run-{RUN_ID}" / "predictions-00000-of-00001.jsonl").write_text("x")
    record = {"run_id": RUN_ID, "replaced": {"run_id": "20240601T000000.000000Z-0000bbbb"}}

    removed, foreign = clean_partition(str(out), record, others=True)

    assert sorted(foreign) == ["NOTES.txt", "predictions.csv"]
    assert sorted(removed) == sorted([
        "run-20240530T000000.000000Z-0000aaaa", "run-20240529T000000.000000Z-0000cccc",
        "run-20240601T000000.000000Z-0000bbbb",  # sorts later, but it is the run this commit replaced
        "_staging", ".temp-predictions", "predictions-00000-of-00001.jsonl", "stats.json.tmp-0123abcd",
        f"run-{RUN_ID}/.temp-dead_letter", f"run-{RUN_ID}/stats.png.tmp-89abcdef"])
    assert sorted(os.listdir(out)) == sorted(["_SUCCESS", f"run-{RUN_ID}", "run-20240602T000000.000000Z-0000dddd",
                                              "NOTES.txt", "predictions.csv"])  # a later run may still be writing
    assert os.listdir(out / f"run-{RUN_ID}") == ["predictions-00000-of-00001.jsonl"]
