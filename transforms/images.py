"""Beam transforms that find, read and decode images, with a dead-letter output.

``ImageRefs`` turns a path, glob or manifest (any Beam filesystem: local,
``gs://``, ...) into ``ImageRef`` elements; ``DecodeImages`` reads and
preprocesses each one into ``(ImageRef, uint8 array)`` and sends every failure
to the ``dead_letter`` output as ``{"uri", "error", "stage"}``. Read and decode
are fused in one DoFn so only the small uint8 crop ever leaves it.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import re
from typing import Iterator, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes, FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from transforms.decode import Decoded, load_image
from transforms.preprocess import PreprocessConfig
from transforms.timing import NAMESPACE, Progress, stage_distribution

DEAD_LETTER = "dead_letter"
MANIFEST_SUFFIXES = (".txt", ".csv", ".jsonl", ".ndjson")


class ImageRef(NamedTuple):
    """One input: its URI and the caller's optional id (from a manifest)."""

    uri: str
    id: Optional[str] = None


def dead_letter(uri: str, error: str, stage: str, id: Optional[str] = None) -> beam.pvalue.TaggedOutput:
    """A dead-letter row on the ``dead_letter`` output."""
    row = {"uri": uri, "error": error, "stage": stage}
    if id is not None:
        row["id"] = id
    return beam.pvalue.TaggedOutput(DEAD_LETTER, row)


def has_glob(path: str) -> bool:
    """True when ``path`` holds a glob character (``*``, ``?`` or ``[``)."""
    return any(c in path for c in "*?[")


def is_manifest(path: str) -> bool:
    """True when ``path`` names a manifest (by suffix: .txt, .csv, .jsonl, .ndjson) rather than images."""
    return path.lower().endswith(MANIFEST_SUFFIXES) and not has_glob(path)


def normalize_pattern(path: str) -> str:
    """A directory (local path or URL ending in '/') becomes a recursive glob of its files."""
    if path.endswith("/"):
        return path + "**"
    if "://" not in path and os.path.isdir(path):
        return os.path.join(path, "**")
    return path


def parse_manifest(name: str, text: str) -> Iterator[object]:
    """Yields ``ImageRef`` per manifest entry, or a dead-letter row for an unusable entry.

    Formats, by suffix: ``.txt`` one URI per line (blank lines and ``#`` comments
    skipped); ``.csv`` with a header holding ``uri`` and optionally ``id``;
    ``.jsonl``/``.ndjson`` objects with ``uri`` and optionally ``id``.
    """
    lower = name.lower()
    if lower.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "uri" not in reader.fieldnames:
            yield dead_letter(name, f"CSV manifest has no 'uri' column (header: {reader.fieldnames}); add a "
                                    f"header line 'uri,id'", "manifest")
            return
        for line_no, row in enumerate(reader, start=2):
            uri = (row.get("uri") or "").strip()
            if not uri:
                yield dead_letter(f"{name}:{line_no}", "manifest row has an empty 'uri'", "manifest")
                continue
            yield ImageRef(uri, (row.get("id") or "").strip() or None)
        return
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or (line.startswith("#") and not lower.endswith((".jsonl", ".ndjson"))):
            continue
        if lower.endswith((".jsonl", ".ndjson")):
            try:
                row = json.loads(line)
            except ValueError as e:
                yield dead_letter(f"{name}:{line_no}", f"manifest line is not valid JSON ({e})", "manifest")
                continue
            uri = row.get("uri") if isinstance(row, dict) else None
            if not isinstance(uri, str) or not uri.strip():
                yield dead_letter(f"{name}:{line_no}", "manifest object has no string 'uri' field", "manifest")
                continue
            raw_id = row.get("id")
            yield ImageRef(uri.strip(), None if raw_id is None else str(raw_id))
        else:
            yield ImageRef(line)


def unlistable_local_files(pattern: str) -> Iterator[tuple]:
    """Local files a glob names but Beam's listing skips because they cannot be stat'ed.

    Beam's local ``match`` silently drops entries whose size it cannot read (a
    symlink to a deleted file, a file removed while listing). They are inputs all
    the same, so they are yielded as ``(path, OSError)`` to become dead letters.
    """
    if "://" in pattern:
        return
    prefix = re.match(r"^[^[*?]*", pattern).group(0)
    if prefix == pattern:
        return  # no glob: a single path is checked at start (it must exist)
    root = prefix if prefix.endswith(os.sep) else os.path.dirname(prefix)
    matches = re.compile(FileSystem.translate_pattern(pattern)).match
    for dirpath, _, files in os.walk(root or "."):
        for name in files:
            path = os.path.join(dirpath, name)
            if not matches(path):
                continue
            try:
                os.path.getsize(path)
            except OSError as e:
                yield path, e


class _Match(beam.DoFn):
    """Pattern -> ``ImageRef`` per matched file, plus dead letters for listed files Beam cannot stat."""

    def setup(self):
        self._inputs = Metrics.counter(NAMESPACE, "inputs")

    def process(self, pattern: str):
        try:
            matched = FileSystems.match([pattern])[0].metadata_list
        except Exception as e:  # a listing failure is a broken setup: fail with the reason
            raise IOError(f"Cannot list {pattern}: {e}") from e
        for metadata in matched:
            self._inputs.inc()
            yield ImageRef(metadata.path)
        for path, error in unlistable_local_files(pattern):
            self._inputs.inc()
            if os.path.islink(path):
                what, fix = "broken symlink (its target is missing)", "restore the target or remove the link"
            else:
                what, fix = "file vanished or cannot be stat'ed", "check the file and the job's permissions"
            yield dead_letter(path, f"cannot read file ({what}: {error.strerror or error}); {fix}", "read")


class _ReadManifest(beam.DoFn):
    def setup(self):
        self._inputs = Metrics.counter(NAMESPACE, "inputs")

    def process(self, path: str):
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                raw = f.read()
        except Exception as e:  # a missing manifest is a broken setup: fail with the reason
            raise IOError(f"Cannot read manifest {path}: {e}") from e
        try:
            # utf-8-sig: spreadsheet exports start CSVs with a byte-order mark that would hide 'uri'.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise IOError(f"Manifest {path} is not UTF-8 text ({e}); save it as UTF-8") from e
        for entry in parse_manifest(path, text):
            self._inputs.inc()  # every entry, usable or not, is an input that must end somewhere
            yield entry


class ImageRefs(beam.PTransform):
    """Path, glob, directory or manifest -> ``ImageRef`` (+ ``dead_letter`` rows for bad manifest lines).

    The result is redistributed (``Reshuffle``) so reading and decoding spread over
    all workers instead of staying on the one that expanded the glob.

    Args:
        path: A glob (``gs://bucket/images/*.jpg``), a directory, or a manifest file.
    """

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, pbegin):
        if is_manifest(self._path):
            parsed = (pbegin | "Manifest" >> beam.Create([self._path])
                      | "ParseManifest" >> beam.ParDo(_ReadManifest()).with_outputs(DEAD_LETTER, main="refs"))
            refs, bad = parsed.refs, parsed[DEAD_LETTER]
        else:
            matched = (pbegin | "Pattern" >> beam.Create([normalize_pattern(self._path)])
                       | "Match" >> beam.ParDo(_Match()).with_outputs(DEAD_LETTER, main="refs"))
            refs, bad = matched.refs, matched[DEAD_LETTER]
        return {"refs": refs | "Spread" >> beam.Reshuffle(), DEAD_LETTER: bad}


class CountDeadLetters(beam.DoFn):
    """Counts every dead-letter row once, whichever stage produced it (metrics and live progress)."""

    def __init__(self, progress_dir: Optional[str] = None):
        self._progress_dir = progress_dir

    def setup(self):
        self._count = Metrics.counter(NAMESPACE, "dead_letters")
        self._progress = Progress(self._progress_dir)

    def process(self, row):
        self._count.inc()
        self._progress.add("dead_letters")
        yield row

    def finish_bundle(self):
        self._progress.flush("dead_letters")


class DecodeImages(beam.DoFn):
    """Reads and preprocesses images: ``ImageRef -> (ImageRef, uint8 array)`` or a dead letter.

    With ``threads`` > 0, images are read and decoded by a small thread pool
    (Pillow and file reads release the GIL) while this DoFn's thread runs the
    downstream batch through the engine: up to ``prefetch`` images are in flight,
    so the next batch is decoded while the current one is inferred.

    Args:
        config: Preprocessing sizes and limits.
        threads: Decode threads per DoFn instance; 0 decodes inline, -1 picks the
            worker's core count (at most 8). Default 0.
        prefetch: Most images in flight per DoFn instance (>= threads). Default 64.
    """

    def __init__(self, config: PreprocessConfig, threads: int = 0, prefetch: int = 64):
        if threads < -1 or prefetch < max(threads, 1):
            raise ValueError(f"need threads >= -1 and prefetch >= threads, got {threads}, {prefetch}")
        self._config = config
        self._threads = threads
        self._prefetch = prefetch

    def setup(self):
        self._read_us = stage_distribution("read")
        self._decode_us = stage_distribution("decode")
        self._decoded = Metrics.counter(NAMESPACE, "images_decoded")
        self._bytes = Metrics.counter(NAMESPACE, "bytes_read")
        self._pool = None
        threads = min(8, os.cpu_count() or 1) if self._threads == -1 else self._threads
        if threads:
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self._pending = collections.deque()

    def start_bundle(self):
        self._pending = collections.deque()

    def _emit(self, ref: ImageRef, loaded: Decoded, window=None, timestamp=None):
        self._read_us.update(int(loaded.read_s * 1e6))
        if loaded.stage == "decode":
            self._bytes.inc(loaded.nbytes)
            self._decode_us.update(int(loaded.decode_s * 1e6))
        if loaded.error is not None:
            out = dead_letter(ref.uri, loaded.error, loaded.stage, ref.id)
            if window is not None:
                out = beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, timestamp, [window]))
            return out
        self._decoded.inc()
        value = (ref, loaded.array)
        return value if window is None else WindowedValue(value, timestamp, [window])

    def process(self, ref: ImageRef, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        if self._pool is None:
            yield self._emit(ref, load_image(ref.uri, self._config))
            return
        self._pending.append((ref, self._pool.submit(load_image, ref.uri, self._config), window, timestamp))
        # Emit finished work in order; block only when the prefetch window is full.
        while self._pending and (len(self._pending) > self._prefetch or self._pending[0][1].done()):
            ref_done, future, w, ts = self._pending.popleft()
            yield self._emit(ref_done, future.result(), w, ts)

    def finish_bundle(self):
        while self._pending:
            ref, future, w, ts = self._pending.popleft()
            yield self._emit(ref, future.result(), w, ts)

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
