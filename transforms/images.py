"""Beam transforms that find, read and decode images, with a dead-letter output.

``ImageRefs`` turns a path, glob or manifest (any Beam filesystem: local,
``gs://``, ...) into ``ImageRef`` elements; ``ReadBatches`` groups them and reads
each batch into one ``ImageBatch`` (decoded uint8 crops on the CPU path, encoded
bytes for the GPU decoder) and sends every failure to the ``dead_letter`` output
as ``{"uri", "error", "stage"}``. Batches, not images, travel through Beam.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
import re
from typing import Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes, FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from transforms.decode import load_image
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


@dataclasses.dataclass
class ImageBatch:
    """A batch of images to score: the unit of work that travels from reading to inference.

    Attributes:
        refs: One per image, in row order: first the ``pixels`` rows, then the ``encoded`` ones.
        pixels: (n, crop, crop, 3) uint8 decoded on the CPU (Pillow), or None.
        encoded: Encoded files for the GPU decoder (``--decode gpu``), one per remaining ref.
    """

    refs: Tuple[ImageRef, ...]
    pixels: Optional[np.ndarray] = None
    encoded: Tuple[bytes, ...] = ()

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def decoded_count(self) -> int:
        return 0 if self.pixels is None else len(self.pixels)

    @property
    def nbytes(self) -> int:
        return (0 if self.pixels is None else self.pixels.nbytes) + sum(len(e) for e in self.encoded)


class ReadImageBatches(beam.DoFn):
    """Reads (and, on the CPU path, decodes) a batch of images: ``[ImageRef] -> ImageBatch``.

    Each image is read, pre-screened and - unless it goes to the GPU decoder - decoded by a
    thread pool (file reads, Pillow and ``gs://`` I/O release the GIL), so ``gs://`` latency
    is hidden and up to ``prefetch`` batches are being read while this DoFn's thread runs the
    current one through the engine downstream. Every image that cannot be read or decoded is
    a ``dead_letter`` row; the rest of its batch goes on. Handling whole batches keeps Beam's
    per-element cost off each image (issue 9: Beam alone tops out near 4,300 elements/s).

    Args:
        config: Preprocessing sizes and limits.
        gpu_decode: Leave images the pre-screen passes encoded for the GPU decoder. Default False.
        threads: Reader threads per DoFn; 0 reads inline, -1 picks the worker's cores (at most
            16). Default -1.
        prefetch: Batches in flight per DoFn instance. Default 2.
    """

    def __init__(self, config: PreprocessConfig, gpu_decode: bool = False, threads: int = -1, prefetch: int = 2):
        if threads < -1 or prefetch < 1:
            raise ValueError(f"need threads >= -1 and prefetch >= 1, got {threads}, {prefetch}")
        self._config = config
        self._gpu_decode = gpu_decode
        self._threads = threads
        self._prefetch = prefetch

    def setup(self):
        self._read_us = stage_distribution("read")
        self._decode_us = stage_distribution("decode")
        self._decoded = Metrics.counter(NAMESPACE, "images_decoded")
        self._bytes = Metrics.counter(NAMESPACE, "bytes_read")
        self._pool = None
        threads = min(16, os.cpu_count() or 1) if self._threads == -1 else self._threads
        self._threads_n = threads
        if threads:
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="read")
        self._pending = collections.deque()

    def start_bundle(self):
        self._pending = collections.deque()

    def _load(self, ref: ImageRef):
        return load_image(ref.uri, self._config, self._gpu_decode)

    def _load_chunk(self, refs):
        return [self._load(ref) for ref in refs]

    def _tasks(self, refs) -> int:
        """Pool tasks for one batch.

        Decoding on the CPU (Pillow releases the GIL) and remote reads (latency) want every
        thread. Reading local files for the GPU decoder is mostly Python (open, header
        pre-screen) and GIL-bound: a few threads with a whole chunk each, since 16 threads
        contending for the GIL made each 43 KB read take 2.6 ms on 16 cores (issue 9, NOTES.md).
        """
        if self._gpu_decode and all("://" not in ref.uri for ref in refs):
            return min(2, self._threads_n)
        return self._threads_n

    def _emit(self, refs, loaded, window=None, timestamp=None):
        def windowed(value):
            return value if window is None else WindowedValue(value, timestamp, [window])

        decoded, encoded = [], []
        for ref, result in zip(refs, loaded):
            self._read_us.update(int(result.read_s * 1e6))
            if result.stage == "decode":
                self._bytes.inc(result.nbytes)
                if result.encoded is None:
                    self._decode_us.update(int(result.decode_s * 1e6))
            if result.error is not None:
                out = dead_letter(ref.uri, result.error, result.stage, ref.id)
                yield beam.pvalue.TaggedOutput(out.tag, windowed(out.value))
            elif result.encoded is not None:
                encoded.append((ref, result.encoded))
            else:
                decoded.append((ref, result.array))
        if decoded or encoded:
            self._decoded.inc(len(decoded))
            pixels = np.stack([array for _, array in decoded]) if decoded else None
            yield windowed(ImageBatch(tuple(ref for ref, _ in decoded) + tuple(ref for ref, _ in encoded),
                                      pixels, tuple(data for _, data in encoded)))

    def process(self, refs, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        refs = list(refs)
        if self._pool is None:
            yield from self._emit(refs, [self._load(ref) for ref in refs])
            return
        tasks = self._tasks(refs)
        size = -(-len(refs) // tasks)
        futures = [self._pool.submit(self._load_chunk, refs[i:i + size]) for i in range(0, len(refs), size)]
        self._pending.append((refs, futures, window, timestamp))
        # Emit finished batches in order; block only when more than `prefetch` are in flight.
        while self._pending and (len(self._pending) > self._prefetch
                                 or all(f.done() for f in self._pending[0][1])):
            yield from self._emit_pending()

    def _emit_pending(self):
        done, futures, w, ts = self._pending.popleft()
        yield from self._emit(done, [result for f in futures for result in f.result()], w, ts)

    def finish_bundle(self):
        while self._pending:
            yield from self._emit_pending()

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class ReadBatches(beam.PTransform):
    """``ImageRef`` -> ``ImageBatch`` of up to ``batch_size`` images (+ ``dead_letter`` rows).

    Args:
        config: Preprocessing sizes and limits.
        batch_size: Images per batch (the bundle's last may be smaller).
        gpu_decode, threads, prefetch: See :class:`ReadImageBatches`.
    """

    def __init__(self, config: PreprocessConfig, batch_size: int, gpu_decode: bool = False, threads: int = -1,
                 prefetch: int = 2):
        super().__init__()
        self._batch_size = batch_size
        self._read = ReadImageBatches(config, gpu_decode, threads, prefetch)

    def expand(self, refs):
        return (refs
                | "Batch" >> beam.BatchElements(min_batch_size=self._batch_size, max_batch_size=self._batch_size)
                | "Read" >> beam.ParDo(self._read).with_outputs(DEAD_LETTER, main="batches"))
