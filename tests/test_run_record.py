"""``pipelines/run_record.py``: stats.json is built once, in the job; the launcher only adds what Beam's
metrics know, and the stats modules do not import the job module back."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from pipelines import run_record
from tests.conftest import REPO
from transforms.timing import latency_bucket

ENGINE = {"engine": "onnxruntime", "model": "m.onnx"}
SETTINGS = {"batch_size": 4, "output": "/out"}


def _summary(dead_letter_file: str, predictions: int = 0, dead: int = 2):
    return {"run_id": "20240531T010203.000000Z-1a2b3c4d", "run_date": "2024-05-31",
            "start_time": "2024-05-31T01:02:03+00:00", "end_time": "2024-05-31T01:02:13+00:00", "skip_scored": None,
            "predictions": predictions, "dead_letters": dead, "skipped": 0, "inputs": predictions + dead,
            "files": {"dead_letter": [f"run-20240531T010203.000000Z-1a2b3c4d/{dead_letter_file}"]}}


def _job_wrote(tmp_path, rows):
    """A run folder whose commit step wrote its dead letters and its stats.json; returns (folder, summary)."""
    folder = tmp_path / "run-20240531T010203.000000Z-1a2b3c4d"
    folder.mkdir()
    name = "dead_letter-00000-of-00001.jsonl"
    (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = _summary(name, dead=len(rows))
    run_record.CommittedStatsWriter(ENGINE, SETTINGS)(str(folder), summary)
    return folder, summary


TOO_BIG = [{"uri": f"/p/{n}.jpg", "error": f"image is {n}0000 pixels, over the pixel limit", "stage": "decode"}
           for n in (1, 2)]


def test_the_job_writes_the_document_with_its_setup_problem(tmp_path):
    folder, _ = _job_wrote(tmp_path, TOO_BIG)
    stats = json.loads((folder / "stats.json").read_text())
    assert (stats["predictions"], stats["dead_letters"], stats["inputs"], stats["unaccounted"]) == (0, 2, 2, 0)
    assert stats["wall_seconds"] == 10.0 and stats["timing"] == run_record.TIMING_COUNTS_ONLY
    assert stats["setup_problem"].startswith("all 2 inputs failed at decode for the same reason")
    assert "raise --max_pixels" in stats["setup_problem"]
    assert stats["engine"] == ENGINE and stats["settings"] == SETTINGS
    assert (folder / "stats.png").read_bytes().startswith(b"\x89PNG")


def test_the_launcher_annotates_what_the_job_wrote_instead_of_building_it_again(tmp_path):
    folder, summary = _job_wrote(tmp_path, TOO_BIG)
    job = json.loads((folder / "stats.json").read_text())
    # Mark the job's document: a launcher that built its own would lose the mark.
    (folder / "stats.json").write_text(json.dumps({**job, "setup_problem": "as the job said"}))
    metrics = {"counters": {"bytes_read": 123, "batches": 1, "predictions": 99},
               "distributions": {"inference_us": {"sum": 2_000_000, "count": 1, "min": 2_000_000, "max": 2_000_000},
                                 "decode_us": {"sum": 1_000_000, "count": 1, "min": 1, "max": 1}},
               "buckets": {latency_bucket(2.0): 1}}
    stats = run_record.add_launcher_timing(str(folder), summary, ENGINE, SETTINGS, metrics, 4.0)
    assert stats["setup_problem"] == "as the job said"
    assert stats["predictions"] == 0  # the committed count, not the metrics' 99
    assert stats["wall_seconds"] == 4.0 and stats["bytes_read"] == 123 and stats["batches"] == 1
    assert stats["stage_seconds"]["inference"] == 2.0 and stats["timing"] == run_record.TIMING_FROM_METRICS
    assert stats["stats_file"] == str(folder / "stats.json")
    assert json.loads((folder / "stats.json").read_text()) == stats  # written back as returned


def test_a_jobs_document_that_cannot_be_read_is_made_again_from_the_record(tmp_path, caplog):
    folder, summary = _job_wrote(tmp_path, TOO_BIG)
    (folder / "stats.json").unlink()
    stats = run_record.add_launcher_timing(str(folder), summary, ENGINE, SETTINGS, {}, 3.0)
    assert "raise --max_pixels" in stats["setup_problem"] and stats["wall_seconds"] == 3.0
    assert "cannot read the job's stats.json" in caplog.text
    assert (folder / "stats.json").exists()


def test_mixed_failures_are_no_setup_problem(tmp_path):
    rows = TOO_BIG[:1] + [{"uri": "/p/x.jpg", "error": "empty file", "stage": "decode"}]
    folder, _ = _job_wrote(tmp_path, rows)
    assert json.loads((folder / "stats.json").read_text())["setup_problem"] is None


def _imports(path):
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_stats_modules_do_not_import_the_job_module():
    for name in ("stats.py", "run_record.py"):
        imported = _imports(REPO / "pipelines" / name)
        assert not {m for m in imported if m.startswith("pipelines.classify_images")}, name
    loaded = subprocess.run([sys.executable, "-c", "import sys, pipelines.run_record, pipelines.partitions; "
                             "print('pipelines.classify_images' in sys.modules)"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert loaded.stdout.strip() == "False", loaded.stderr
