"""transforms/sinks.py: WriteRows on Beam's TestPipeline writes every row once, under the names the
commit lists, as UTF-8 JSON Lines or as Parquet with the prediction schema; the sinks record the
``write`` stage time that stats.json reports."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.sinks import FORMATS, ParquetSink, WriteRows

PREDICTIONS = [
    {"uri": "/photos/chelsea.jpg", "id": "7", "top_k": [{"class_id": 285, "label": "Egyptian Mau", "score": 0.375},
                                                        {"class_id": 281, "label": "tabby", "score": 0.25}]},
    {"uri": "/photos/café-crème.jpg", "top_k": [{"class_id": 967, "label": "espresso", "score": 0.8125}]},
    {"uri": "gs://bucket/日本/x.jpg", "id": "a\"b", "top_k": []},
]
DEAD = [{"uri": "/photos/empty.jpg", "error": "empty file (0 bytes)", "stage": "decode"},
        {"uri": "/photos/ü.jpg", "error": "cannot read file", "stage": "read", "id": "3"}]


def _names(folder: Path):
    """The files in ``folder`` (fileio's temporary folders aside)."""
    return sorted(name for name in os.listdir(folder) if not name.startswith(".temp-"))


def _sharded_names(prefix: str, suffix: str):
    """An ``assert_that`` matcher: at least one file, each named ``PREFIX-SSSSS-of-NNNNN.SUFFIX``."""
    from apache_beam.testing.util import BeamAssertException

    def match(names):
        bad = [name for name in names if not re.fullmatch(rf"{prefix}-\d{{5}}-of-\d{{5}}\.{suffix}", name)]
        if not names or bad:
            raise BeamAssertException(f"expected {prefix}-SSSSS-of-NNNNN.{suffix} files, got {names}")
    return match


def _jsonl_rows(folder: Path, prefix: str):
    rows = []
    for name in _names(folder):
        if name.startswith(prefix):
            rows.extend(json.loads(line) for line in (folder / name).read_text(encoding="utf-8").splitlines())
    return rows


def test_rows_are_written_once_each_as_utf8_json_lines_under_the_names_the_commit_lists(tmp_path):
    with TestPipeline() as p:
        written = p | beam.Create(DEAD) | WriteRows(str(tmp_path), "dead_letter", "jsonl", shards=1)
        assert_that(written | beam.Map(lambda result: os.path.basename(result.file_name)),
                    equal_to(["dead_letter-00000-of-00001.jsonl"]))
    assert _names(tmp_path) == ["dead_letter-00000-of-00001.jsonl"]
    assert sorted(_jsonl_rows(tmp_path, "dead_letter"), key=lambda r: r["uri"]) == sorted(DEAD, key=lambda r: r["uri"])
    # Non-ASCII paths stay readable in the file (UTF-8), not \u escapes.
    text = (tmp_path / "dead_letter-00000-of-00001.jsonl").read_bytes()
    assert "/photos/ü.jpg".encode("utf-8") in text
    # Byte for byte compact JSON: the standard library's text without its spaces.
    assert sorted(text.decode("utf-8").splitlines()) == sorted(
        json.dumps(row, ensure_ascii=False, separators=(",", ":")) for row in DEAD)


def test_numpy_numbers_are_numbers_and_nan_and_infinities_are_written_as_before(tmp_path):
    """orjson would write NaN and infinities as null: a raw output's -inf (a log-probability) would read as a missing
    value and disagree with Parquet. Rows holding one are written as the standard library writes them, and a row
    with a real null (a manifest column left empty) keeps it."""
    rows = [{"uri": "/a.jpg", "top_k": [{"class_id": np.int64(3), "label": "x", "score": np.float32(0.5)}]},
            {"uri": "/b.jpg", "top_k": [{"class_id": 1, "label": "y", "score": float("nan")},
                                        {"class_id": 2, "label": "z", "score": float("-inf")}]},
            {"uri": "/c.jpg", "id": None, "logits": [0.25, float("inf"), -1.5]},
            {"uri": "/d.jpg", "id": None, "logits": [0.25, np.float32("-inf")]},
            {"uri": "/e.jpg", "sku": None, "logits": [0.25, 1e-300, -0.0]}]
    with TestPipeline() as p:
        _ = p | beam.Create(rows) | WriteRows(str(tmp_path), "predictions", "jsonl", shards=1)
    text = (tmp_path / "predictions-00000-of-00001.jsonl").read_text(encoding="utf-8")
    written = {row["uri"]: row for row in map(json.loads, text.splitlines())}
    assert written["/a.jpg"]["top_k"] == [{"class_id": 3, "label": "x", "score": 0.5}]
    scores = [c["score"] for c in written["/b.jpg"]["top_k"]]
    assert np.isnan(scores[0]) and scores[1] == float("-inf")
    assert written["/c.jpg"]["logits"] == [0.25, float("inf"), -1.5] and written["/c.jpg"]["id"] is None
    assert written["/d.jpg"]["logits"] == [0.25, float("-inf")]
    assert written["/e.jpg"] == {"uri": "/e.jpg", "sku": None, "logits": [0.25, 1e-300, -0.0]}
    assert "null,null" not in text and text.count("\n") == 5 and " " not in text


def test_blocks_of_rows_are_written_row_by_row(tmp_path):
    blocks = [PREDICTIONS[:2], PREDICTIONS[2:], []]
    with TestPipeline() as p:
        written = p | beam.Create(blocks) | WriteRows(str(tmp_path), "predictions", "jsonl", blocks=True)
        assert_that(written | beam.Map(lambda result: os.path.basename(result.file_name)),
                    _sharded_names("predictions", "jsonl"))
    assert all(re.fullmatch(r"predictions-\d{5}-of-\d{5}\.jsonl", name) for name in _names(tmp_path))
    rows = _jsonl_rows(tmp_path, "predictions")
    assert sorted(rows, key=lambda r: r["uri"]) == sorted(PREDICTIONS, key=lambda r: r["uri"])


def test_parquet_predictions_have_the_prediction_schema_and_every_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with TestPipeline() as p:
        p | beam.Create([PREDICTIONS]) | WriteRows(str(tmp_path), "predictions", "parquet", shards=1, blocks=True)
    assert _names(tmp_path) == ["predictions-00000-of-00001.parquet"]
    table = pq.read_table(tmp_path / "predictions-00000-of-00001.parquet")
    assert table.schema.field("top_k").type == pa.list_(pa.struct([("class_id", pa.int32()), ("label", pa.string()),
                                                                  ("score", pa.float32())]))
    got = sorted(table.to_pylist(), key=lambda r: r["uri"])
    want = sorted(PREDICTIONS, key=lambda r: r["uri"])
    assert [r["uri"] for r in got] == [r["uri"] for r in want]
    assert [r["id"] for r in got] == [r.get("id") for r in want]  # a row without an id reads back as null
    for g, w in zip(got, want):
        assert [c["class_id"] for c in g["top_k"]] == [c["class_id"] for c in w["top_k"]]
        assert [c["label"] for c in g["top_k"]] == [c["label"] for c in w["top_k"]]
        np.testing.assert_allclose([c["score"] for c in g["top_k"]], [c["score"] for c in w["top_k"]],
                                   rtol=0, atol=1e-7)


def test_parquet_sink_writes_full_row_groups_and_the_rest_at_flush(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    rows = [{"uri": f"/photos/{i}.jpg", "top_k": [{"class_id": i, "label": f"class_{i}", "score": i / 8}]}
            for i in range(5)]
    sink = ParquetSink(row_group_size=2)
    with open(path, "wb") as fh:
        sink.open(fh)
        for row in rows:
            sink.write(row)
        sink.flush()
    parquet = pq.ParquetFile(path)
    assert [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)] == [2, 2, 1]
    assert [r["uri"] for r in parquet.read().to_pylist()] == [r["uri"] for r in rows]


def test_the_sinks_record_the_write_stage_for_stats(tmp_path):
    from apache_beam.metrics.metric import MetricsFilter

    from transforms.timing import NAMESPACE

    p = TestPipeline()
    p | beam.Create(DEAD) | WriteRows(str(tmp_path), "dead_letter", "jsonl", shards=1)
    result = p.run()
    result.wait_until_finish()
    (write,) = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE).with_name("write_us"))["distributions"]
    assert write.committed.count >= len(DEAD) + 1  # one per row written, one per flush


def test_an_unknown_format_is_refused_when_the_pipeline_is_built(tmp_path):
    with pytest.raises(ValueError, match=rf"output_format must be one of {re.escape(str(FORMATS))}, got 'csv'"):
        WriteRows(str(tmp_path), "predictions", "csv")


def test_parquet_raw_outputs_are_fixed_size_lists_in_the_models_float_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms.postprocess import RowLayout

    layout = RowLayout("raw", (("embedding", "float16", 3), ("logits", "float32", None)), model="m.onnx@sha256:ab")
    rows = [{"uri": "/a.jpg", "model": "m.onnx@sha256:ab", "embedding": [0.5, 1.0, 2.0], "logits": [1.0, 2.0]},
            {"uri": "/b.jpg", "id": "b", "model": "m.onnx@sha256:ab", "embedding": [4.0, 8.0, 16.0], "logits": [3.0]}]
    with TestPipeline() as p:
        p | beam.Create([rows]) | WriteRows(str(tmp_path), "predictions", "parquet", shards=1, blocks=True, rows=layout)
    table = pq.read_table(tmp_path / "predictions-00000-of-00001.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 3)
    assert table.schema.field("logits").type == pa.list_(pa.float32())  # size unknown before the run
    got = sorted(table.to_pylist(), key=lambda r: r["uri"])
    assert [r["embedding"] for r in got] == [[0.5, 1.0, 2.0], [4.0, 8.0, 16.0]]
    assert [r["id"] for r in got] == [None, "b"] and {r["model"] for r in got} == {"m.onnx@sha256:ab"}


def test_parquet_predictions_carry_the_kept_manifest_columns_as_nullable_strings(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms.postprocess import RowLayout
    from transforms.sinks import prediction_schema

    layout = RowLayout(columns=("sku", "label_gt"))
    assert prediction_schema(layout).names == ["uri", "id", "sku", "label_gt", "model", "top_k"]
    rows = [{"uri": "/photos/chelsea.jpg", "id": "7", "sku": "A-1", "label_gt": "cat",
             "top_k": [{"class_id": 285, "label": "Egyptian Mau", "score": 0.375}]},
            {"uri": "/photos/日本.jpg", "sku": None, "label_gt": "", "top_k": []}]
    with TestPipeline() as p:
        p | beam.Create([rows]) | WriteRows(str(tmp_path), "predictions", "parquet", shards=1, blocks=True,
                                            rows=layout)
    table = pq.read_table(tmp_path / "predictions-00000-of-00001.parquet")
    assert table.schema.names == ["uri", "id", "sku", "label_gt", "model", "top_k"]
    assert all(table.schema.field(name).type == pa.string() and table.schema.field(name).nullable
               for name in ("sku", "label_gt"))
    got = sorted(table.to_pylist(), key=lambda r: r["uri"])
    assert [(r["id"], r["sku"], r["label_gt"]) for r in got] == [("7", "A-1", "cat"), (None, None, "")]
