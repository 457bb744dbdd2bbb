"""Hostile but realistic inputs. Nothing hangs, nothing is silently dropped, setup
mistakes stop at start with one line naming the flag.

Every run that happens checks the contract (inputs = predictions + dead letters, unaccounted 0).
Runs that could hang on a regression (FIFOs) or need another user (permissions) run the CLI in a
subprocess with a time limit.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Tuple

import pytest
from PIL import Image

from pipelines import classify_images
from pipelines.partitions import committed_files, committed_rows, committed_stats
from tests.conftest import jpeg_bytes, photo

REPO = Path(__file__).resolve().parent.parent
#: No case may take longer than this: a hang is a failure, not a slow test.
CASE_LIMIT_S = 60


@pytest.fixture(scope="module")
def two_photos(tmp_path_factory):
    """Two real JPEGs (cat, coffee) as bytes, written where each test needs them."""
    return {"chelsea.jpg": jpeg_bytes(photo("chelsea")), "coffee.jpg": jpeg_bytes(photo("coffee"))}


def _write(directory: Path, photos) -> list:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in photos.items():
        (directory / name).write_bytes(data)
        paths.append(str(directory / name))
    return paths


def _rows(out: Path):
    return committed_rows(str(out), "predictions"), committed_rows(str(out), "dead_letter")


def _contract(out: Path, inputs: int):
    stats = committed_stats(str(out))
    predictions, dead = _rows(out)
    assert (stats["inputs"], stats["unaccounted"]) == (inputs, 0), stats
    assert len(predictions) + len(dead) == inputs == stats["predictions"] + stats["dead_letters"]
    return predictions, dead, stats


def _main(capsys, *argv):
    """Runs the CLI in-process; returns (exit code, stderr). A user mistake never prints a traceback."""
    code = classify_images.main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def _cli(argv, user=None, cwd=None, timeout=CASE_LIMIT_S, limits=None):
    """Runs the CLI in a subprocess (optionally as another user, or under resource limits:
    {resource.RLIMIT_*: bytes}) within the case time limit."""
    import resource

    prefix = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": "/tmp"}

    def set_limits():
        for which, value in (limits or {}).items():
            resource.setrlimit(which, (value, value))

    proc = subprocess.run(prefix + [sys.executable, "-m", "pipelines.classify_images", *argv], cwd=cwd or REPO,
                          env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=set_limits if limits else None)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


# 1. Never open what is not a regular file; no read may hang the job; name slow reads.

def test_fifo_among_the_inputs_is_a_dead_letter_and_the_job_finishes(model_path, tmp_path, two_photos):
    images = tmp_path / "in"
    _write(images, two_photos)
    os.mkfifo(images / "p.jpg")  # open() on it would block until a writer appears
    out = tmp_path / "out"
    proc = _cli(["--input", str(images), "--output", str(out)])  # TimeoutExpired = the old hang
    assert proc.returncode == 0, proc.stderr[-2000:]
    predictions, dead, _ = _contract(out, 3)
    assert len(predictions) == 2
    (row,) = dead
    assert row["uri"].endswith("p.jpg") and row["stage"] == "read"
    assert "not a regular file" in row["error"] and "FIFO" in row["error"]


def test_non_regular_files_are_refused_without_opening_them(tmp_path):
    from images.reading import not_a_regular_file

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    (tmp_path / "ok.jpg").write_bytes(b"x")
    assert "FIFO" in not_a_regular_file(str(tmp_path / "fifo"))
    assert "is a directory" in not_a_regular_file(str(tmp_path / "dir"))
    assert "character device" in not_a_regular_file("/dev/null")
    assert not_a_regular_file(str(tmp_path / "ok.jpg")) is None


def test_a_stalled_read_times_out_and_progress_names_it(tmp_path):
    # A FIFO with no writer is a real read that never finishes: read_with_timeout must give up.
    from pipelines.stats import slow_reads_note
    from images.reading import ReadTimeout, read_with_timeout

    fifo = str(tmp_path / "stuck.jpg")
    os.mkfifo(fifo)
    seen = {}

    def watch():
        time.sleep(0.5)
        seen["note"] = slow_reads_note(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    try:
        with pytest.raises(ReadTimeout, match=r"did not finish within 1 s.*--read_timeout_s"):
            read_with_timeout(fifo, timeout_s=1.0)
        assert time.monotonic() - start < 5
    finally:
        watcher.join()
        # Release the reader left behind: a writer opens and closes, the read sees end of file.
        fd = os.open(fifo, os.O_WRONLY)
        os.close(fd)
    assert "1 slow read(s): " + fifo in seen["note"]
    assert slow_reads_note(0.2) == ""


def test_a_stalled_read_becomes_a_read_dead_letter(tmp_path, monkeypatch):
    import images.reading as decode
    from images.reading import load_image, not_a_regular_file
    from images.pillow_decoder import PreprocessConfig

    # A FIFO is refused before any read (not_a_regular_file); here the read itself must time out,
    # as a stuck gs:// object or network mount would (URLs are not stat'ed).
    fifo = str(tmp_path / "stuck.jpg")
    os.mkfifo(fifo)
    monkeypatch.setattr(decode, "regular_file_size", lambda path: (None, None))
    try:
        loaded = load_image(fifo, PreprocessConfig(), read_timeout_s=0.5)
    finally:
        monkeypatch.undo()
        os.close(os.open(fifo, os.O_WRONLY))
    assert (loaded.stage, loaded.array) == ("read", None)
    assert "did not finish within 0.5 s" in loaded.error and not_a_regular_file(fifo)


# 2. A directory the job cannot list is a dead letter, counted, and named in the summary.

def _photos_another_user_can_read(two_photos) -> Tuple[Path, Path]:
    """A world-writable root holding ``in/`` with the two photos, readable by any user.

    Not under tmp_path: pytest resets its own root (/tmp/pytest-of-root) to 0700 at every session
    start, so another pytest run on the machine would lock the other user out mid-test.
    """
    import atexit
    import tempfile

    root = Path(os.path.realpath(tempfile.mkdtemp(prefix="hostile-shared-")))
    atexit.register(shutil.rmtree, root, True)
    os.chmod(root, 0o777)
    images = root / "in"
    _write(images, two_photos)
    os.chmod(images, 0o755)
    return root, images


@pytest.mark.skipif(not hasattr(os, "geteuid") or (os.geteuid() == 0 and not shutil.which("setpriv")),
                    reason="needs setpriv to run the job as another user")
def test_unreadable_subdirectory_becomes_a_dead_letter(model_path, two_photos):
    root, images = _photos_another_user_can_read(two_photos)
    secret = images / "private"
    _write(secret, {"hidden.jpg": two_photos["chelsea.jpg"]})
    out = root / "out"
    if os.geteuid() == 0:
        os.chmod(secret, 0o700)  # owned by root, the job runs as nobody
        user = "65534"
    else:
        os.chmod(secret, 0o000)
        user = None
    try:
        proc = _cli(["--input", str(images), "--output", str(out)], user=user)
    finally:
        os.chmod(secret, 0o755)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(1 of them directories that could not be listed)" in proc.stdout
    predictions, dead, stats = _contract(out, 3)
    assert len(predictions) == 2 and stats["unlistable_directories"] == 1
    (row,) = dead
    assert row["uri"] == str(secret) and row["error"].startswith("cannot list directory (PermissionError")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to run as nobody")
def test_unwritable_output_and_unlistable_input_stop_at_start(model_path, two_photos):
    root, images = _photos_another_user_can_read(two_photos)
    locked = root / "locked"
    locked.mkdir(mode=0o755)  # root's: nobody cannot create anything in it
    proc = _cli(["--input", str(images), "--output", str(locked / "out")], user="65534")
    assert proc.returncode == 2 and f"the job's user cannot write to {locked}" in proc.stderr, proc.stderr
    os.chmod(images, 0o700)
    proc = _cli(["--input", str(images), "--output", str(root / "out")], user="65534")
    assert proc.returncode == 2 and "is a directory the job cannot list (Permission denied)" in proc.stderr


# 3, 6, 10. A manifest is setup: one the job cannot use stops it at start.

def test_csv_manifest_without_uri_column_stops_at_start(tmp_path, capsys, two_photos):
    paths = _write(tmp_path / "in", two_photos)
    manifest = tmp_path / "list.csv"
    manifest.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(paths)))
    code, err = _main(capsys, "--input", str(manifest), "--output", str(tmp_path / "o"))
    assert code == 2 and f"--input {manifest}: CSV manifest" in err
    assert "no 'uri' column (its header: 'id,path'); make the first line 'uri' or 'uri,id'" in err
    assert not (tmp_path / "o").exists()


def test_csv_header_names_are_stripped_and_the_manifests_columns_reach_every_row(model_path, tmp_path, two_photos):
    paths = _write(tmp_path / "in", two_photos)
    (tmp_path / "in" / "corrupt.jpg").write_bytes(two_photos["chelsea.jpg"][:2000])
    manifest = tmp_path / "list.csv"
    manifest.write_text("id, uri , sku ,label_gt\n"
                        + "".join(f"a{i}, {p},S-{i}, cat{i} \n" for i, p in enumerate(paths))
                        + "a2,in/corrupt.jpg,S-2,cat\n"
                        + "a3,in/gone.jpg,S-3\n"  # a short row: no label_gt
                        + "a4,/photos/\x00.jpg,S-4,cat\n")
    out = tmp_path / "o"
    assert classify_images.main(["--input", str(manifest), "--output", str(out)]) == 0
    predictions, dead, stats = _contract(out, 5)
    # The values as the csv module reads them (not stripped: a column's spaces may be the user's data).
    assert sorted((r["id"], r["sku"], r["label_gt"]) for r in predictions) == [("a0", "S-0", " cat0 "),
                                                                             ("a1", "S-1", " cat1 ")]
    assert all(list(r) == ["uri", "id", "sku", "label_gt", "model", "top_k"] for r in predictions), predictions
    by_stage = {r["stage"]: r for r in dead}
    assert {stage: (r.get("id"), r["sku"], r["label_gt"]) for stage, r in by_stage.items()} == {
        "decode": ("a2", "S-2", "cat"), "read": ("a3", "S-3", None), "manifest": (None, None, None)}
    assert list(by_stage["decode"]) == ["uri", "id", "sku", "label_gt", "error", "stage"]
    assert stats["settings"]["keep_columns"] == ["sku", "label_gt"]


def test_keep_columns_naming_a_column_the_manifest_lacks_stops_at_start(tmp_path, capsys, two_photos):
    paths = _write(tmp_path / "in", two_photos)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("".join(json.dumps({"uri": p, "sku": i}) + "\n" for i, p in enumerate(paths)))
    code, err = _main(capsys, "--input", str(manifest), "--output", str(tmp_path / "o"), "--keep_columns", "sku,shard")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--keep_columns sku,shard: manifest {manifest} has no column 'shard'; its columns (besides uri and id): " \
           f"sku" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name,text", [("empty.txt", ""), ("comments.txt", "# nothing yet\n\n# todo\n"),
                                       ("header.csv", "uri,id\n"), ("blank.jsonl", "\n\n")])
def test_empty_manifest_stops_at_start_like_an_empty_glob(tmp_path, capsys, name, text):
    (tmp_path / name).write_text(text)
    code, err = _main(capsys, "--input", str(tmp_path / name), "--output", str(tmp_path / "o"))
    assert code == 2 and f"--input {tmp_path / name}: manifest" in err and "lists no images" in err


def test_latin1_manifest_is_one_clean_error_line(tmp_path, capsys):
    manifest = tmp_path / "list.csv"
    manifest.write_bytes("uri,id\n/photos/café.jpg,1\n".encode("latin-1"))
    code, err = _main(capsys, "--input", str(manifest), "--output", str(tmp_path / "o"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--input {manifest}: manifest" in err and "not UTF-8 text (byte 0xe9 on line 2)" in err
    assert "iconv -f latin1 -t utf-8" in err


# 4, 5, 7. Setup mistakes that used to exit 0 after failing every image.

def _fixed_batch_model(model_path: str, path: Path, batch: int) -> str:
    import onnx

    model = onnx.load(model_path)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, str(path))
    return str(path)


def test_model_with_a_fixed_batch_of_one_is_used_or_the_flag_is_named(model_path, tmp_path, capsys, two_photos):
    fixed = _fixed_batch_model(model_path, tmp_path / "b1.onnx", 1)
    images = tmp_path / "in"
    _write(images, two_photos)
    code, err = _main(capsys, "--input", str(images), "--output", str(tmp_path / "bad"), "--model", fixed,
                      "--batch_size", "8")
    assert code == 2 and "--batch_size 8 does not fit" in err and "pass --batch_size 1" in err
    out = tmp_path / "o"
    code, _ = _main(capsys, "--input", str(images), "--output", str(out), "--model", fixed)
    assert code == 0
    predictions, dead, stats = _contract(out, 2)
    assert len(predictions) == 2 and stats["settings"]["batch_size"] == 1


def test_model_with_a_fixed_batch_above_one_stops_at_start(model_path, tmp_path, capsys, two_photos):
    fixed = _fixed_batch_model(model_path, tmp_path / "b4.onnx", 4)
    code, err = _main(capsys, "--input", str(_write(tmp_path / "in", two_photos)[0]), "--output",
                      str(tmp_path / "o"), "--model", fixed)
    assert code == 2 and "fixed batch dimension of 4" in err and "dynamic batch dimension" in err


def test_batch_size_beyond_memory_stops_at_start_naming_the_flag(model_path, tmp_path, capsys, two_photos):
    code, err = _main(capsys, "--input", _write(tmp_path / "in", two_photos)[0], "--output", str(tmp_path / "o"),
                      "--batch_size", "100000")
    assert code == 2 and "--batch_size 100000 needs about" in err and "pass --batch_size" in err
    fits = int(err.split("pass --batch_size ")[1].split()[0])
    assert 8 <= fits < 100000
    assert not (tmp_path / "o").exists()


def test_failed_allocation_reason_names_batch_size():
    from transforms.images import ImageRef
    from transforms.postprocess import FailedBatchToDeadLetters

    error = RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for 2.1 GB")
    rows = list(FailedBatchToDeadLetters().process(([(ImageRef("/a.jpg"), None)] * 3, error)))
    assert len(rows) == 3 and rows[0]["error"].endswith("the batch of 3 did not fit in memory: lower --batch_size")


def test_every_image_failing_the_same_way_exits_non_zero_with_rows_written(model_path, tmp_path, capsys,
                                                                         two_photos):
    images = tmp_path / "in"
    _write(images, two_photos)
    out = tmp_path / "o"
    code, err = _main(capsys, "--input", str(images), "--output", str(out), "--max_pixels", "1000")
    assert code == 1
    assert "all 2 inputs failed at decode for the same reason" in err and "raise --max_pixels" in err
    _, dead, stats = _contract(out, 2)
    assert len(dead) == 2 and "raise --max_pixels" in stats["setup_problem"]


def test_mixed_failures_are_bad_records_not_a_setup_problem(model_path, tmp_path, capsys, two_photos):
    images = tmp_path / "in"
    _write(images, {"chelsea.jpg": two_photos["chelsea.jpg"]})
    (images / "notes.jpg").write_text("not an image")
    (images / "empty.jpg").write_bytes(b"")
    out = tmp_path / "o"
    assert _main(capsys, "--input", str(images), "--output", str(out))[0] == 0
    (images / "chelsea.jpg").unlink()  # now nothing is scored, but the two failures differ
    out2 = tmp_path / "o2"
    assert _main(capsys, "--input", str(images), "--output", str(out2))[0] == 0
    _contract(out2, 2)


# 8, 9. Output and input paths that used to give tracebacks.

def test_output_naming_an_existing_file_stops_at_start(tmp_path, capsys, two_photos):
    images = tmp_path / "in"
    _write(images, two_photos)
    (tmp_path / "taken").write_text("x")
    code, err = _main(capsys, "--input", str(images), "--output", str(tmp_path / "taken"))
    assert code == 2 and "--output" in err and "is an existing file; pass a directory" in err
    code, err = _main(capsys, "--input", str(images), "--output", str(tmp_path / "taken" / "sub"))
    assert code == 2 and f"is under the file {tmp_path / 'taken'}" in err


@pytest.mark.parametrize("folder", ["photos.txt", "scans.csv", "Holiday [2019]"])
def test_folder_with_a_manifest_suffix_or_glob_characters_is_scored_as_a_folder(model_path, tmp_path, capsys,
                                                                                 two_photos, folder):
    images = tmp_path / folder
    _write(images / "sub", two_photos)
    out = tmp_path / "o"
    assert _main(capsys, "--input", str(images), "--output", str(out))[0] == 0
    predictions, _, _ = _contract(out, 2)
    assert sorted(os.path.basename(r["uri"]) for r in predictions) == ["chelsea.jpg", "coffee.jpg"]


# 12, 16. Manifest entries: file:// URIs, relative paths, directories, JSON ids.

def test_manifest_entries_file_uris_relative_paths_directories_and_json_ids(model_path, tmp_path, capsys,
                                                                             two_photos, monkeypatch):
    lists = tmp_path / "lists"
    paths = _write(lists / "imgs", two_photos)
    (lists / "imgs" / "folder").mkdir()
    manifest = lists / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in [
        {"uri": "file://" + paths[0], "id": {"nested": 1}},
        {"uri": "imgs/coffee.jpg", "id": [1, "a"]},
        {"uri": "imgs/gone.jpg", "id": 3},
        {"uri": str(lists / "imgs" / "folder"), "id": True},
    ]) + "\n")
    monkeypatch.chdir(tmp_path)  # relative entries must not depend on the working directory
    out = tmp_path / "o"
    assert _main(capsys, "--input", str(manifest), "--output", str(out))[0] == 0
    predictions, dead, _ = _contract(out, 4)
    assert {r["id"]: r["uri"] for r in predictions} == {'{"nested": 1}': paths[0], '[1, "a"]': paths[1]}
    by_id = {r["id"]: r for r in dead}
    assert "relative paths in a manifest resolve against the manifest's folder " + str(lists) in by_id["3"]["error"]
    assert "is a directory" in by_id["true"]["error"] and "check the path exists" not in by_id["true"]["error"]


# A bad manifest line is that line's dead letter; every other line is scored.

_LATIN1 = "/photos/café.jpg".encode("latin-1")  # a line another tool wrote in Latin-1


def _bad_lines(suffix: str, good: list) -> Tuple[list, dict]:
    """The lines of a ``suffix`` manifest listing the ``good`` photos among bad lines, and
    {line number: regex its dead-letter reason must match} for the bad ones."""
    if suffix == ".txt":
        lines = [good[0], b"/photos/cat\x00.jpg", _LATIN1, good[1]]
        return lines, {2: r"holds a NUL byte", 3: r"is not UTF-8 text \(byte 0xe9\)"}
    if suffix == ".csv":
        lines = [b"uri,id", good[0] + b",a", b"/photos/cat\x00.jpg,b", _LATIN1 + b",c",
                 b'"/photos/' + b"x" * 200_000 + b'.jpg",d', good[1] + b",e"]
        return lines, {3: r"holds a NUL byte", 4: r"is not UTF-8 text \(byte 0xe9\)",
                       5: r"cannot be read as CSV \(field larger than field limit"}
    lines = [json.dumps({"uri": good[0].decode()}).encode(), b'{"uri": "/photos/cat\\u0000.jpg"}',
             b'{"uri": "' + _LATIN1 + b'"}', b"[" * 100_000 + b"]" * 100_000,
             json.dumps({"uri": good[1].decode()}).encode()]
    return lines, {2: r"holds a NUL byte", 3: r"is not UTF-8 text \(byte 0xe9\)", 4: r"nested too deeply"}


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_a_bad_manifest_line_is_its_own_dead_letter_and_the_rest_is_scored(model_path, tmp_path, capsys,
                                                                           two_photos, suffix):
    good = [p.encode() for p in _write(tmp_path / "in", two_photos)]
    lines, bad = _bad_lines(suffix, good)
    manifest = tmp_path / f"list{suffix}"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "o"
    code, err = _main(capsys, "--input", str(manifest), "--output", str(out))
    assert code == 0, err
    predictions, dead, _ = _contract(out, 2 + len(bad))
    assert sorted(r["uri"] for r in predictions) == sorted(p.decode() for p in good)
    assert sorted(r["uri"] for r in dead) == sorted(f"{manifest}:{n}" for n in bad)
    for row in dead:
        line = int(row["uri"].rsplit(":", 1)[1])
        assert row["stage"] == "manifest" and row["error"].startswith(f"manifest {manifest} line {line}: "), row
        assert re.search(bad[line], row["error"]) and "fix or remove that line" in row["error"], row


def test_a_file_name_that_is_not_utf8_is_a_dead_letter_and_the_rest_is_scored(model_path, tmp_path, capsys,
                                                                              two_photos):
    # The listing's counterpart of a bad manifest line: a name another system wrote in Latin-1
    # cannot travel through Beam or into the outputs as text, and used to stop the job.
    images = tmp_path / "in"
    _write(images, two_photos)
    latin = os.path.join(os.fsencode(images), "café.jpg".encode("latin-1"))
    with open(latin, "wb") as f:
        f.write(two_photos["chelsea.jpg"])
    out = tmp_path / "o"
    code, err = _main(capsys, "--input", str(images), "--output", str(out))
    assert code == 0, err
    predictions, dead, _ = _contract(out, 3)
    assert sorted(os.path.basename(r["uri"]) for r in predictions) == ["chelsea.jpg", "coffee.jpg"]
    (row,) = dead
    assert row["uri"] == str(images / "caf\\xe9.jpg") and row["stage"] == "read", row
    assert "file name is not UTF-8 (byte 0xe9)" in row["error"] and "rename the file" in row["error"], row


# Exit status: 2 for a setup mistake found at start, 1 for a failure after the job started.

def test_a_write_failing_after_the_start_exits_1_with_one_line_and_leaves_no_temporary_file(model_path, tmp_path,
                                                                                           two_photos):
    # A file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes fail with EFBIG as on a full
    # disk) lets the start checks and the small row files through and fails the larger stats.png:
    # a disk filling up while the job runs, reproduced without privileges or a tmpfs.
    import resource

    images = tmp_path / "in"
    _write(images, two_photos)
    out = tmp_path / "o"
    proc = _cli(["--input", str(images), "--output", str(out)], limits={resource.RLIMIT_FSIZE: 16 << 10})
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "File too large" in last, proc.stderr[-3000:]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], sorted(map(str, out.rglob("*")))
    proc = _cli(["--input", str(images), "--output", str(tmp_path / "o2"), "--model", str(tmp_path / "none.onnx")])
    assert proc.returncode == 2 and "--model file not found" in proc.stderr, proc.stderr[-3000:]  # a setup mistake


def test_an_engine_that_fails_to_load_on_the_worker_exits_1(model_path, tmp_path, capsys, two_photos):
    # The model's inputs and outputs pass the start checks; ONNX Runtime refuses its graph only when a
    # worker loads it, after the job started (on Dataflow, minutes later on another machine).
    import onnx

    model = onnx.load(model_path)
    model.graph.node[5].op_type = "NoSuchOp"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    code, err = _main(capsys, "--input", _write(tmp_path / "in", two_photos)[0], "--output", str(tmp_path / "o"),
                      "--model", str(broken))
    assert code == 1, err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and "ONNX Runtime could not load model" in line and "NoSuchOp" in line, err


def test_output_that_is_a_dangling_symlink_is_named_as_such(tmp_path, capsys, two_photos):
    images = tmp_path / "in"
    _write(images, two_photos)
    os.symlink(tmp_path / "unmounted" / "scored", tmp_path / "link")
    code, err = _main(capsys, "--input", str(images), "--output", str(tmp_path / "link"))
    assert code == 2 and "is a dangling symbolic link" in err and "an existing file" not in err, err
    assert f"to {tmp_path / 'unmounted' / 'scored'}" in err and "remove it or point it at a directory" in err, err


def test_a_huge_input_file_is_a_dead_letter_naming_its_size_and_the_fix(model_path, tmp_path, two_photos):
    # A 30 GiB sparse file takes no disk. The address-space limit makes a read of it all fail at
    # once with MemoryError (as on a worker with less memory) instead of filling this machine's.
    import resource

    images = tmp_path / "in"
    _write(images, two_photos)
    with open(images / "huge.jpg", "wb") as f:
        f.truncate(30 << 30)
    limits = {resource.RLIMIT_AS: 8 << 30}
    out = tmp_path / "o"
    proc = _cli(["--input", str(images), "--output", str(out)], limits=limits)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictions, dead, _ = _contract(out, 3)
    (row,) = dead
    assert row["uri"].endswith("huge.jpg") and row["stage"] == "read", row
    assert "30.0 GiB" in row["error"] and "--max_pixels" in row["error"] and "remove it" in row["error"], row
    assert "credentials" not in row["error"], row
    # With --max_pixels raised so far that the size no longer rules it out, the read itself runs out of memory.
    out = tmp_path / "o2"
    proc = _cli(["--input", str(images), "--output", str(out), "--max_pixels", str(1 << 32)], limits=limits)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = _contract(out, 3)[1]
    assert "30.0 GiB" in row["error"] and "more than this worker can hold in memory" in row["error"], row
    assert "credentials" not in row["error"], row


# 13. Symlink loops are named as such.

def test_symlink_loop_is_not_called_a_missing_target(model_path, tmp_path, capsys, two_photos):
    images = tmp_path / "in"
    _write(images, two_photos)
    os.symlink(images / "loop.jpg", images / "loop.jpg")
    out = tmp_path / "o"
    assert _main(capsys, "--input", str(images), "--output", str(out))[0] == 0
    _, dead, _ = _contract(out, 3)
    assert dead[0]["error"].startswith("cannot read file (symlink loop") and "missing" not in dead[0]["error"]


# 11, 14. Messages that misled.

def test_bomb_message_quotes_the_max_pixels_in_force():
    from images.pillow_decoder import BadImageError, PreprocessConfig, preprocess_image

    buf = io.BytesIO()
    Image.new("1", (20_000, 9_000)).save(buf, format="PNG")  # 180 Mpx: over twice Pillow's own limit
    with pytest.raises(BadImageError) as caught:
        preprocess_image(buf.getvalue(), PreprocessConfig(max_pixels=1_000_000))
    assert "180.0 Mpx, over the pixel limit of 1.0 Mpx (--max_pixels 1000000" in str(caught.value)
    assert "178956970" not in str(caught.value)


def test_corrupt_avif_is_called_corrupt_not_unsupported():
    from PIL import features

    from images.pillow_decoder import BadImageError, preprocess_image

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    buf = io.BytesIO()
    Image.fromarray(photo("chelsea")).save(buf, format="AVIF")
    data = buf.getvalue()
    assert preprocess_image(data).shape == (224, 224, 3)
    with pytest.raises(BadImageError, match=r"^truncated or corrupt AVIF data"):
        preprocess_image(data[: len(data) // 2])


# 15 and friends: model and labels files named by their flag.

def test_model_and_labels_files_are_named_by_their_flag(model_path, tmp_path, capsys, two_photos):
    image = _write(tmp_path / "in", two_photos)[0]
    text = tmp_path / "model.txt"
    text.write_text("this is not a model at all\n")
    common = ["--input", image, "--output", str(tmp_path / "o")]
    code, err = _main(capsys, *common, "--model", str(text))
    assert code == 2 and f"--model file {text} is not an ONNX model" in err
    code, err = _main(capsys, *common, "--model", str(tmp_path))
    assert code == 2 and f"--model file {tmp_path} is a directory" in err
    code, err = _main(capsys, *common, "--labels_file", str(tmp_path / "nope.txt"))
    assert code == 2 and "--labels_file not found" in err and "make model" not in err
    latin = tmp_path / "labels.txt"
    latin.write_bytes("chat\ncafé\n".encode("latin-1"))
    code, err = _main(capsys, *common, "--labels_file", str(latin))
    assert code == 2 and f"--labels_file {latin} is not UTF-8 text" in err


# More hostile-user cases.

@pytest.mark.parametrize("flags,message", [
    (["--decode_threads", "-5"], "--decode_threads must be >= -1, got -5"),
    (["--prefetch", "0"], "--prefetch must be >= 1, got 0"),
    (["--read_timeout_s", "-1"], "--read_timeout_s must be >= 0"),
    (["--batch_size", "4", "--min_batch_size", "8"], "--min_batch_size 8 is larger than --batch_size 4"),
    (["--ort_sessions", "0"], "--ort_sessions must be >= 1, got 0"),
    (["--model_copies", "2"], "--model_copies > 1 needs --share_model_across_processes"),
])
def test_out_of_range_flags_stop_at_start_naming_the_flag(tmp_path, capsys, two_photos, flags, message):
    code, err = _main(capsys, "--input", _write(tmp_path / "in", two_photos)[0], "--output", str(tmp_path / "o"),
                      *flags)
    assert code == 2 and message in err


def test_output_inside_the_scored_input_folder_is_refused(tmp_path, capsys, two_photos):
    images = tmp_path / "in"
    _write(images, two_photos)
    code, err = _main(capsys, "--input", str(images), "--output", str(images / "scored"))
    assert code == 2 and "is inside --input" in err and "a rerun would score the results" in err


def test_output_holding_results_this_pipeline_did_not_commit_is_refused(model_path, tmp_path, capsys, two_photos):
    # Results an older version of this pipeline (no commit step) or another tool left: a commit would
    # delete them or mix its shards with theirs, so the job stops at start and touches nothing.
    images = tmp_path / "in"
    _write(images, two_photos)
    out = tmp_path / "o"
    out.mkdir()
    (out / "predictions-00000-of-00002.jsonl").write_text('{"uri": "/old/a.jpg", "top_k": []}\n')
    (out / "stats.json").write_text("{}\n")
    (out / "_SUCCESS").write_text("")  # Hadoop and Spark write an empty _SUCCESS: not this pipeline's
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    code, err = _main(capsys, "--input", str(images), "--output", str(out))
    assert code == 2 and "already holds results of an earlier run" in err and "did not commit" in err
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before


def test_output_holding_a_committed_partition_is_replaced_without_mixing(model_path, tmp_path, capsys, two_photos):
    # An output holding results was once refused outright, because their shards mixed with the next
    # run's; a partition this pipeline committed is now replaced as a whole, so a rerun with another
    # format (or shard count) leaves only its own files, and stats agree with them.
    images = tmp_path / "in"
    _write(images, two_photos)
    out = tmp_path / "o"
    assert _main(capsys, "--input", str(images), "--output", str(out))[0] == 0
    assert list(out.glob("run-*/predictions-*.jsonl")) and (out / "_SUCCESS").exists()
    (out / "_SUCCESS").write_text('{"run_id": "trunc')  # a truncated record: replaced by the rerun
    code, err = _main(capsys, "--input", str(images), "--output", str(out), "--output_format", "parquet")
    assert code == 0, err
    assert not list(out.glob("**/predictions-*.jsonl"))
    import pyarrow.parquet as pq

    rows = sum(pq.read_table(p).num_rows for p in committed_files(str(out), "predictions"))
    stats = committed_stats(str(out))
    assert rows == stats["predictions"] == len(two_photos) and stats["unaccounted"] == 0


def test_quoted_tilde_gets_a_hint(tmp_path, capsys):
    code, err = _main(capsys, "--input", "~/no-such-photos-dir-xyz/*.jpg", "--output", str(tmp_path / "o"))
    assert code == 2 and "A quoted '~' is not expanded" in err
