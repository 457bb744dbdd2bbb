"""Sinks for prediction and dead-letter rows: JSON Lines (default) or Parquet.

Both are ``fileio.FileSink`` implementations used with ``fileio.WriteToFiles``,
so files are written to a temporary location and moved into place atomically,
on any Beam filesystem. The time spent in ``write``/``flush`` (serialisation and
I/O) is recorded as the ``write`` stage.
"""

from __future__ import annotations

import json
import math
import time

import apache_beam as beam
import orjson
from apache_beam.io import fileio
from apache_beam.options.value_provider import StaticValueProvider

from engines import storage
from transforms.timing import stage_distribution

FORMATS = ("jsonl", "parquet")


#: Rows are encoded by orjson (a dependency of apache-beam[gcp], named in setup.py): 9x faster than the standard
#: library's encoder on a batch of top-k rows (1.36-1.39 ms against 0.15 ms for 256, 2-core VM), all of it time the
#: bundle thread holds the GIL, which the GPU job's threads share (benchmarks/NOTES.md). The text is compact JSON
#: (no spaces) and numpy scalars are written as numbers.
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
#: orjson writes NaN and infinities as null, which would make a raw output's -inf (a log-probability) look like a
#: missing value and disagree with Parquet. A row holding one is written by the standard library, as before:
#: ``NaN``, ``Infinity``, ``-Infinity``, which Python's and most JSON Lines readers accept.
#: orjson has already encoded every row it is given (a type it refuses fails there), so the only values left for
#: ``default`` are numpy scalars.
_STANDARD = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=lambda value: value.item())


def _non_finite(value) -> bool:
    """Whether a row's value holds a NaN or an infinity anywhere (lists and dicts are searched)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if hasattr(value, "dtype"):  # a numpy scalar or array
        import numpy as np

        return np.issubdtype(value.dtype, np.floating) and not bool(np.isfinite(value).all())
    return False


def encode_rows(rows) -> bytes:
    """JSON Lines (UTF-8, a newline after each) for ``rows``: orjson's, or the standard library's for a row that
    holds a NaN or an infinity (orjson writes those as null, so only a block holding a null is searched)."""
    dumps = orjson.dumps
    lines = [dumps(row, option=_OPTIONS) for row in rows]
    block = b"".join(lines)
    if b"null" not in block:
        return block
    return b"".join((_STANDARD.encode(row) + "\n").encode("utf-8") if b"null" in line and _non_finite(row) else line
                    for row, line in zip(rows, lines))


class JsonLinesSink(fileio.FileSink):
    """One JSON object per line, UTF-8. With ``blocks``, each element is a list of rows."""

    def __init__(self, blocks: bool = False):
        self._blocks = blocks

    def open(self, fh):
        self._fh = fh
        self._us = stage_distribution("write")

    def write(self, record):
        start = time.perf_counter()
        rows = record if self._blocks else (record,)
        self._fh.write(encode_rows(rows))
        self._us.update(int((time.perf_counter() - start) * 1e6))

    def flush(self):
        start = time.perf_counter()
        self._fh.flush()
        self._us.update(int((time.perf_counter() - start) * 1e6))


def prediction_schema(rows=None):
    """The Parquet schema of prediction rows, as ``rows`` (a ``transforms.postprocess.RowLayout``) lays them out.

    ``uri``, ``id`` (nullable), one nullable string per kept manifest column (``rows.columns``, in
    order), ``model``, then: ``top_k`` or ``classes`` (lists of
    ``{class_id, label, score}``), or with raw outputs one column per output: a fixed-size list of
    its values per image (float32, or float16 as the model gives it), a list where the size is not
    known before the run.

    Args:
        rows: The layout. Default: top-k rows (``RowLayout()``).
    """
    import pyarrow as pa

    from transforms.postprocess import RowLayout

    rows = rows or RowLayout()
    fields = [("uri", pa.string()), ("id", pa.string()), *((name, pa.string()) for name in rows.columns),
              ("model", pa.string())]
    if rows.mode == "raw":
        types = {"float16": pa.float16(), "float64": pa.float64()}
        for name, dtype, size in rows.outputs:
            value = types.get(dtype, pa.float32())
            fields.append((name, pa.list_(value, size) if size else pa.list_(value)))
    else:
        fields.append(("classes" if rows.mode == "threshold" else "top_k", pa.list_(
            pa.struct([("class_id", pa.int32()), ("label", pa.string()), ("score", pa.float32())]))))
    return pa.schema(fields)


class ParquetSink(fileio.FileSink):
    """Prediction rows as Parquet, buffered into row groups of ``row_group_size`` rows.

    Args:
        row_group_size: Rows per row group. Default 8192.
        blocks: Each element is a list of rows. Default False.
        rows: What each row holds (``transforms.postprocess.RowLayout``). Default: top-k rows.
    """

    def __init__(self, row_group_size: int = 8192, blocks: bool = False, rows=None):
        self._row_group_size = row_group_size
        self._blocks = blocks
        self._rows_layout = rows

    def open(self, fh):
        import pyarrow.parquet as pq

        self._schema = prediction_schema(self._rows_layout)
        self._writer = pq.ParquetWriter(fh, self._schema)
        self._rows = []
        self._us = stage_distribution("write")

    def _write_group(self):
        import pyarrow as pa

        if self._rows:
            columns = {name: [row.get(name) for row in self._rows] for name in self._schema.names}
            self._writer.write_table(pa.Table.from_pydict(columns, schema=self._schema))
            self._rows = []

    def write(self, record):
        start = time.perf_counter()
        if self._blocks:
            self._rows.extend(record)
        else:
            self._rows.append(record)
        if len(self._rows) >= self._row_group_size:
            self._write_group()
        self._us.update(int((time.perf_counter() - start) * 1e6))

    def flush(self):
        start = time.perf_counter()
        self._write_group()
        self._writer.close()
        self._us.update(int((time.perf_counter() - start) * 1e6))


class WriteRows(beam.PTransform):
    """Writes rows to ``DIR/{prefix}-SSSSS-of-NNNNN.{jsonl|parquet}``.

    Args:
        directory: Output directory (local or any Beam filesystem).
        prefix: File name prefix, e.g. "predictions" or "dead_letter".
        output_format: "jsonl" (default) or "parquet" (prediction rows only).
        shards: Number of files; None lets the runner choose. Default None.
        blocks: Each element is a list of rows (written at once) rather than one row. Default False.
        rows: What each prediction row holds (``transforms.postprocess.RowLayout``), for the Parquet
            schema. Default: top-k rows.

    Returns (from expand): fileio's FileResult per file written (the commit step waits on them).
    """

    def __init__(self, directory: str, prefix: str, output_format: str = "jsonl", shards=None, blocks: bool = False,
                 rows=None):
        super().__init__()
        if output_format not in FORMATS:
            raise ValueError(f"output_format must be one of {FORMATS}, got {output_format!r}")
        self._directory = directory
        self._prefix = prefix
        self._format = output_format
        self._shards = shards
        self._blocks = blocks
        self._rows = rows

    def expand(self, rows):
        blocks, layout = self._blocks, self._rows
        sink = ((lambda _: ParquetSink(blocks=blocks, rows=layout)) if self._format == "parquet"
                else (lambda _: JsonLinesSink(blocks)))
        return rows | fileio.WriteToFiles(
            path=self._directory,
            file_naming=fileio.default_file_naming(self._prefix, f".{self._format}"),
            sink=sink,
            shards=self._shards,
            temp_directory=StaticValueProvider(str, storage.join(self._directory, ".temp-" + self._prefix)))
