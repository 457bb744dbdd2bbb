"""transforms/scored.py: --skip_scored tolerates damaged bookkeeping under its root, and skips by
canonical URI."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipelines import classify_images, partitions
from tests.conftest import jpeg_bytes, photo

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
