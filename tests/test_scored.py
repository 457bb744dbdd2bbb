"""transforms/scored.py: --skip_scored tolerates damaged bookkeeping under its root, and skips by
canonical URI; whole CLI runs first, then ``CheckScored`` alone on Beam's ``TestPipeline`` over
partitions written in ``tmp_path``: what is recorded, what is skipped and which partitions count."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from engines import storage
from pipelines import classify_images, partitions
from tests.conftest import jpeg_bytes, photo
from transforms.scored import FINGERPRINTS, SKIPPED, CheckScored, fingerprint

FAST = ["--batch_size", "2", "--progress_every_s", "0", "--decode_threads", "2"]


def _photos(folder: Path, names) -> str:
    folder.mkdir(parents=True)
    for name in names:
        image = photo(name)
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(image if image.ndim == 3 else np.stack([image] * 3, -1)))
    return str(folder) + "/"


def test_damaged_records_under_the_root_are_skipped_with_a_warning_and_the_run_goes_on(model_path, tmp_path,
                                                                                         caplog):
    incoming = _photos(tmp_path / "in", ["chelsea", "coffee", "astronaut"])
    root = tmp_path / "scored"
    day = ["--input", incoming, *FAST, "--skip_scored", str(root)]
    for date in ("2024-05-28", "2024-05-29", "2024-05-30"):  # each scores (and records) all three
        classify_images.run(["--input", incoming, *FAST, "--output", str(root / f"dt={date}")])
    # One partition's _SUCCESS is truncated, another's _scored file is garbage, and a third folder
    # holds another tool's empty _SUCCESS and a _SUCCESS that is not even a file.
    (root / "dt=2024-05-28" / "_SUCCESS").write_text('{"run_id": "2024')
    scored = partitions.committed_files(str(root / "dt=2024-05-29"), "scored")
    Path(scored[0]).write_bytes(b"\x00\xff not json\n")
    (root / "spark").mkdir()
    (root / "spark" / "_SUCCESS").write_text("")
    (root / "odd" / "_SUCCESS").mkdir(parents=True)
    caplog.set_level(logging.WARNING)
    stats = classify_images.run(day + ["--output", str(root / "dt=2024-05-31")])
    # dt=2024-05-30 is intact, so everything is skipped; the damaged files were named, not fatal.
    assert (stats["predictions"], stats["skipped"], stats["unaccounted"]) == (0, 3, 0)
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(root / "dt=2024-05-28" / "_SUCCESS") in warnings and "rerun that day" in warnings
    assert scored[0] in warnings
    assert str(root / "spark" / "_SUCCESS") in warnings


def test_only_damaged_records_mean_everything_is_scored_again(model_path, tmp_path):
    incoming = _photos(tmp_path / "in", ["chelsea", "coffee"])
    root = tmp_path / "scored"
    day = ["--input", incoming, *FAST, "--skip_scored", str(root)]
    classify_images.run(day + ["--output", str(root / "dt=1")])
    for path in partitions.committed_files(str(root / "dt=1"), "scored"):
        Path(path).write_text('{"uri": "truncated')
    stats = classify_images.run(day + ["--output", str(root / "dt=2")])
    assert (stats["predictions"], stats["skipped"]) == (2, 0)


# --- CheckScored alone, on Beam's TestPipeline, over files in tmp_path --------------------------

def _files(folder: Path, names) -> dict:
    """Small real files of distinct sizes; returns {name: canonical path}."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(bytes([i]) * (10 + i))
    return {name: storage.canonical(str(folder / name)) for name in names}


def _partition(folder: Path, scored, dead=(), **record) -> None:
    """A committed partition: _SUCCESS lists one _scored file recording the fingerprints of the
    files ``scored`` names, and one dead-letter file with ``dead`` ((uri, stage) pairs)."""
    run = folder / "run-1"
    run.mkdir(parents=True)
    (run / "_scored-00000-of-00001.jsonl").write_text(
        "".join(json.dumps({"uri": uri, **fingerprint(uri)}) + "\n" for uri in scored))
    (run / "dead_letter-00000-of-00001.jsonl").write_text(
        "".join(json.dumps({"uri": uri, "error": "...", "stage": stage}) + "\n" for uri, stage in dead))
    (folder / "_SUCCESS").write_text(json.dumps({
        "run_id": "r1", "unaccounted": 0, **record,
        "files": {"scored": ["run-1/_scored-00000-of-00001.jsonl"],
                  "dead_letter": ["run-1/dead_letter-00000-of-00001.jsonl"]}}))


def _run_check(batches, want_refs, want_records, want_skipped, skip_root=None, output="/nowhere/out",
               replaces=None):
    """Runs CheckScored over ``batches`` (lists of paths) and checks its three outputs: the paths
    kept for scoring (per batch, sorted), the fingerprint records, and the number skipped."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from transforms.images import ImageRef

    with TestPipeline() as p:
        refs = p | beam.Create([[ImageRef(uri) for uri in batch] for batch in batches])
        out = refs | CheckScored(skip_root, output, replaces)
        assert_that(out["refs"] | "Uris" >> beam.Map(lambda batch: sorted(ref.uri for ref in batch)),
                    equal_to(want_refs), label="refs")
        assert_that(out[FINGERPRINTS] | "Records" >> beam.FlatMap(lambda block: block),
                    equal_to(want_records), label="records")
        assert_that(out[SKIPPED] | "Skipped" >> beam.CombineGlobally(sum), equal_to([want_skipped]), label="skipped")


def test_without_a_root_everything_is_scored_and_every_existing_file_is_recorded(tmp_path):
    paths = _files(tmp_path / "in", ["a.jpg", "b.jpg", "c.jpg"])
    missing = str(tmp_path / "in" / "gone.jpg")
    spelled = str(tmp_path / "in") + "/./c.jpg"  # recorded under its one canonical spelling
    records = [{"uri": paths[name], **fingerprint(paths[name])} for name in ("a.jpg", "b.jpg", "c.jpg")]
    assert records[1]["size"] == 11 and records[1]["mtime"] == round(os.stat(paths["b.jpg"]).st_mtime, 3)
    _run_check([[paths["a.jpg"], missing], [paths["b.jpg"], spelled]],
               want_refs=[sorted([paths["a.jpg"], missing]), sorted([paths["b.jpg"], spelled])],
               want_records=records, want_skipped=0)


def test_refs_leave_the_check_with_the_size_its_stat_found_so_the_reader_need_not_stat_again(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from transforms.images import ImageRef

    paths = _files(tmp_path / "in", ["a.jpg", "b.jpg"])
    os.symlink(paths["b.jpg"], tmp_path / "in" / "link.jpg")
    os.mkfifo(tmp_path / "in" / "pipe.jpg")
    uris = [paths["a.jpg"], str(tmp_path / "in" / "link.jpg"), str(tmp_path / "in" / "pipe.jpg"),
            str(tmp_path / "in" / "gone.jpg"), str(tmp_path / "in" / "folder")]
    (tmp_path / "in" / "folder").mkdir()
    with TestPipeline() as p:
        out = p | beam.Create([[ImageRef(uri, "id-" + uri[-6:]) for uri in uris]]) | CheckScored(None, str(tmp_path / "o"))
        assert_that(out["refs"] | beam.FlatMap(lambda refs: [(r.uri, r.id, r.size) for r in refs]),
                    equal_to([(paths["a.jpg"], "id-" + paths["a.jpg"][-6:], 10),
                              (uris[1], "id-" + uris[1][-6:], 11),  # the link's target, as reading follows it
                              *[(uri, "id-" + uri[-6:], None) for uri in uris[2:]]]))


def test_one_lstat_fingerprints_a_file_as_stat_and_islink_do(tmp_path):
    # A plain file costs one lstat, not os.stat then islink; a link, a FIFO, a missing file, a dangling link, a
    # linked folder and a path with ".." get the fingerprint, link answer and spelling the two calls gave.
    from transforms.scored import _checked_files, local_fingerprint, record_uris

    real = tmp_path / "real"
    paths = _files(real, ["a.jpg", "b.jpg"])
    (tmp_path / "link.jpg").symlink_to(real / "b.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "linked").symlink_to(real)
    os.mkfifo(tmp_path / "fifo.jpg")
    cases = [paths["a.jpg"], str(tmp_path / "link.jpg"), str(tmp_path / "dangling.jpg"), str(tmp_path / "fifo.jpg"),
             str(tmp_path / "missing.jpg"), str(tmp_path / "linked" / "a.jpg"),
             str(tmp_path / "linked" / ".." / "real" / "b.jpg"), os.path.relpath(paths["b.jpg"])]
    for path in cases:
        fp, link = local_fingerprint(path)
        assert fp == fingerprint(path), path
        if ".." in path.split(os.sep):
            assert link is None  # left for canonical_files to check
        elif fp is not None:
            assert link == os.path.islink(os.path.abspath(path)), path
    assert local_fingerprint(str(tmp_path / "link.jpg"))[1] is True
    assert local_fingerprint(paths["a.jpg"])[1] is False
    checked = _checked_files(cases)
    found = [path for path in cases if fingerprint(path) is not None]
    assert [fp for fp, _ in checked] == [fingerprint(path) for path in cases]
    assert [uri for (fp, uri) in checked if fp is not None] == record_uris(found) == [storage.canonical(p) for p in found]
    assert record_uris(found)[1] == paths["b.jpg"]  # the link's target, not the link


def test_skip_root_skips_files_a_committed_partition_settled_and_scores_the_rest(tmp_path):
    paths = _files(tmp_path / "in", ["same.jpg", "changed.jpg", "read_failed.jpg", "corrupt.jpg", "new.jpg"])
    root = tmp_path / "scored"
    _partition(root / "dt=1", [paths[n] for n in ("same.jpg", "changed.jpg", "read_failed.jpg", "corrupt.jpg")],
               dead=[(paths["read_failed.jpg"], "read"), (paths["corrupt.jpg"], "decode")])
    mtime = os.stat(paths["changed.jpg"]).st_mtime
    os.utime(paths["changed.jpg"], (mtime + 5, mtime + 5))  # rewritten since: a new fingerprint
    kept = ["changed.jpg", "new.jpg", "read_failed.jpg"]  # a read failure is tried again; a corrupt file is not
    _run_check([list(paths.values())], want_refs=[sorted(paths[n] for n in kept)],
               want_records=[{"uri": paths[n], **fingerprint(paths[n])} for n in kept], want_skipped=2,
               skip_root=str(root), output=str(root / "dt=2"))


@pytest.mark.parametrize("case", ["the partition this run replaces", "the same partition under its run id",
                                  "a partition that lost track of inputs"])
def test_partitions_that_do_not_count_as_scored(tmp_path, case):
    paths = _files(tmp_path / "in", ["a.jpg", "b.jpg"])
    root = tmp_path / "scored"
    day = root / "dt=1"
    _partition(day, list(paths.values()), run_id="r1",
               unaccounted=1 if case == "a partition that lost track of inputs" else 0)
    output = str(day) if case == "the partition this run replaces" else str(root / "dt=2")
    replaces = "r1" if case == "the same partition under its run id" else None
    _run_check([list(paths.values())], want_refs=[sorted(paths.values())],
               want_records=[{"uri": p, **fingerprint(p)} for p in paths.values()], want_skipped=0,
               skip_root=str(root), output=output, replaces=replaces)
