"""Beam transforms that find, read and decode images, with a dead-letter output.

``ImageRefs`` turns a path, glob or manifest (any Beam filesystem: local,
``gs://``, ...) into ``ImageRef`` elements, or lists of them (one element per batch) as the
pipeline asks for them; ``ReadImageBatches`` reads
each batch into one ``ImageBatch`` (decoded uint8 crops on the CPU path, encoded
bytes for the GPU decoder) and sends every failure to the ``dead_letter`` output
as ``{"uri", ["id"], [columns], "error", "stage"}``. Batches, not images, travel through Beam.

A manifest's own columns (``sku``, ``label_gt``, ...) travel on each ``ImageRef`` and are written in
every row of that input, prediction or dead letter (:func:`ref_fields`), so users can join the
results back to their records; which columns a run keeps is decided once, at start
(:func:`resolve_keep_columns`, ``--keep_columns``).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import io
import json
import logging
import os
import pickle
import re
import threading
import urllib.parse
import warnings
from typing import Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from engines import storage
from images.dali_file_reader import DaliFileReader
from images.reading import (DEFAULT_READ_TIMEOUT_S, Decoded, describe_stat_error, load_image, load_local_batch,
                            read_timeout_reason)
from images.pillow_decoder import PreprocessConfig
from transforms.ahead import start as start_ahead
from transforms.timing import NAMESPACE, Progress, stage_distribution

_LOG = logging.getLogger(__name__)

DEAD_LETTER = "dead_letter"
MANIFEST_SUFFIXES = (".txt", ".csv", ".jsonl", ".ndjson")
#: Manifests that can hold columns of their own (a .txt manifest is one URI per line).
COLUMN_SUFFIXES = (".csv", ".jsonl", ".ndjson")
#: Fields the job writes in its rows (predictions: ``top_k`` or ``classes``, and the model; dead letters): a
#: manifest column of one of these names would overwrite it, so it is refused (:func:`resolve_keep_columns`);
#: the names of raw outputs are refused too (``pipelines/settings.py`` passes them as ``reserved``).
RESERVED_COLUMNS = ("uri", "id", "top_k", "classes", "error", "stage", "model")

#: A manifest's own columns on one input: ``(name, value)`` per kept column, in the kept order; a value
#: is text, or None where the entry has none (a short CSV row, a missing JSON key or null).
Columns = Tuple[Tuple[str, Optional[str]], ...]


class ImageRef(NamedTuple):
    """One input: its URI, the caller's optional id, and the manifest's columns kept for its rows.

    Attributes:
        uri: The path or URI read.
        id: The manifest's ``id``, as text, or None.
        columns: The manifest's kept columns (:data:`Columns`), or None when the run keeps none. A tuple
            of pairs, not a dict, so a ref stays hashable and compares and pickles as a value.
        size: A local file's size in bytes, set by the job's check (``transforms.scored.CheckScored``) when its
            ``stat`` found a regular file, else None. The reader then takes the file as checked and makes no
            ``stat`` of its own (:func:`images.reading.load_local_batch`); never part of a row.
    """

    uri: str
    id: Optional[str] = None
    columns: Optional[Columns] = None
    size: Optional[int] = None


def ref_fields(ref: ImageRef) -> Dict[str, Optional[str]]:
    """The fields every row about ``ref`` starts with: ``uri``, ``id`` (only when it has one), then the
    kept manifest columns in their order. Each row builder (predictions, dead letters) starts from this,
    so a field added to a ref reaches every row the same way."""
    row: Dict[str, Optional[str]] = {"uri": ref.uri}
    if ref.id is not None:
        row["id"] = ref.id
    row.update(ref.columns or ())
    return row


def ref_dead_letter(ref: ImageRef, error: str, stage: str) -> beam.pvalue.TaggedOutput:
    """The dead-letter row of one input, ``{"uri", ["id"], [columns], "error", "stage"}``, on the
    ``dead_letter`` output."""
    return beam.pvalue.TaggedOutput(DEAD_LETTER, {**ref_fields(ref), "error": error, "stage": stage})


def dead_letter(uri: str, error: str, stage: str, id: Optional[str] = None,
                columns: Optional[Columns] = None) -> beam.pvalue.TaggedOutput:
    """A dead-letter row on the ``dead_letter`` output (see :func:`ref_dead_letter`)."""
    return ref_dead_letter(ImageRef(uri, id, columns), error, stage)


def has_glob(path: str) -> bool:
    """True when ``path`` holds a glob character (``*``, ``?`` or ``[``)."""
    return any(c in path for c in "*?[")


def is_manifest(path: str) -> bool:
    """True when ``path`` names a manifest (by suffix: .txt, .csv, .jsonl, .ndjson) rather than images.

    A directory is a directory whatever its name ends in (``photos.txt/`` is scored recursively).
    """
    if not path.lower().endswith(MANIFEST_SUFFIXES) or has_glob(path):
        return False
    return storage.is_url(path) or not os.path.isdir(path)


def normalize_pattern(path: str) -> str:
    """A directory (local path or URL ending in '/') becomes a recursive glob of its files.

    A local directory's own name is escaped, so a folder named ``Holiday [2019]`` is not read
    as a glob character class.
    """
    if not storage.is_url(path) and os.path.isdir(path):
        return os.path.join(glob.escape(path), "**")
    if path.endswith("/"):
        return path + "**"
    return path


class ManifestError(ValueError):
    """A manifest the job cannot use at all (unreadable, not UTF-8, no 'uri' column, no entries):
    a setup mistake that stops the job at start, not a bad record."""


def read_manifest(path: str) -> str:
    """The text of a manifest, local or on any Beam filesystem.

    Bytes that are not UTF-8 are kept as surrogate escapes (``surrogateescape``), so one line
    another tool wrote in Latin-1 becomes that line's dead letter (:func:`parse_manifest`) rather
    than stopping the job; :func:`check_manifest` refuses a file in which no entry decodes.

    Raises:
        ManifestError: it cannot be read, or is too large to hold; the message says how to fix it.
    """
    try:
        raw = storage.read(path)
    except MemoryError:
        raise ManifestError(f"manifest {path}{_size_note(path)} is larger than this machine can hold in memory; "
                            f"split it into smaller manifests run as separate jobs, or pass the folder of the "
                            f"images (a glob) as --input") from None
    except Exception as e:  # Beam filesystems raise several types
        raise ManifestError(f"cannot read manifest {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    # utf-8-sig: spreadsheet exports start CSVs with a byte-order mark that would hide 'uri'.
    return raw.decode("utf-8-sig", "surrogateescape")


def _size_note(path: str) -> str:
    """" (12.3 GiB)" for a file whose size can be read, else ""."""
    try:
        size = FileSystems.match([path], limits=[1])[0].metadata_list[0].size_in_bytes
    except Exception:  # only a detail of an error message
        return ""
    return f" ({size / 2**30:.1f} GiB)"


#: Bytes that were not UTF-8, as ``surrogateescape`` decoding keeps them (U+DC80..U+DCFF).
_UNDECODED = re.compile("[\udc80-\udcff]")
#: Any surrogate: in a JSON string, an escape such as ``\ud800`` with no partner, which no
#: output (UTF-8 JSON Lines, Parquet) can hold.
_SURROGATE = re.compile("[\ud800-\udfff]")
#: The fix for most bad lines; a manifest is the user's file, so the line is theirs to mend.
_FIX_LINE = "fix or remove that line"
#: Line breaks as editors count them, so a dead letter's line number is the one an editor shows.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


#: A NUL byte: no path or URI holds one (the OS refuses it; before this check one such line
#: stopped the whole job midway, in os.stat).
_NUL_PROBLEM = "holds a NUL byte (binary or corrupt data: no path or URI holds one)"


def _line_problem(name: str, text: str) -> Optional[Tuple[str, str]]:
    """(problem, fix) of a manifest line's text that cannot name an input, or None.

    Checked on the raw line, before the csv or json module reads it, so the reason names the
    cause (bytes that are not UTF-8, a NUL byte) rather than what it broke.
    """
    bad = _UNDECODED.search(text)
    if bad is not None:
        return (f"is not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x})",
                f"re-save the manifest as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {os.path.basename(name)} > "
                f"fixed{os.path.splitext(name)[1]}`), or {_FIX_LINE}")
    if "\x00" in text:
        return _NUL_PROBLEM, _FIX_LINE
    return None


def _bad_line(name: str, line_no, problem: str, fix: str = _FIX_LINE, *,
              keep: Sequence[str] = ()) -> beam.pvalue.TaggedOutput:
    """The ``manifest`` dead letter of one manifest line (or a CSV record starting there).

    It carries every kept column as None: no value of a line that cannot be read can be trusted, and
    so every row of a run has the same keys.
    """
    return dead_letter(f"{name}:{line_no}", f"manifest {name} line {line_no}: {problem}; {fix}", "manifest",
                       columns=_columns(keep, {}))


def _json_text(value) -> Optional[str]:
    """A manifest value as row text: a string as it is, null as None, anything else as its JSON."""
    return None if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _columns(keep: Sequence[str], row: dict) -> Optional[Columns]:
    """The kept columns of one entry (``row``: its fields by name), or None when the run keeps none."""
    return tuple((name, _json_text(row.get(name))) for name in keep) or None


def _resolve(uri: str, base: str) -> str:
    """A manifest entry as a path the filesystems understand.

    ``file:///a/b.jpg`` becomes the local path ``/a/b.jpg``; a relative path resolves against
    the manifest's own folder (``base``), as most tools that read file lists do, not against
    the job's working directory.
    """
    if uri.startswith("file://"):
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc in ("", "localhost"):
            return urllib.parse.unquote(parsed.path)
        return uri
    if storage.is_url(uri) or os.path.isabs(uri) or not base:
        return uri
    return storage.join(base, uri)


def _entry(uri: str, raw_id, name: str, line_no, keep: Sequence[str] = (), row: Optional[dict] = None) -> object:
    """An ``ImageRef`` for one manifest entry (``row``: its fields, from which the ``keep`` columns are
    taken), or a dead letter: a relative path that is missing, or a ``uri``, ``id`` or column value no
    input can have."""
    ref_id = _json_text(raw_id)
    columns = _columns(keep, row or {})
    if "\x00" in uri:  # a JSON escape (\u0000); raw NUL bytes are caught on the line
        return _bad_line(name, line_no, _NUL_PROBLEM, keep=keep)
    if any(text is not None and _SURROGATE.search(text)
           for text in (uri, ref_id, *(value for _, value in columns or ()))):
        return _bad_line(name, line_no, "holds a JSON escape of a lone surrogate (such as \\ud800), which is not text "
                                        "any output can hold", keep=keep)
    base = name[:name.rstrip("/").rfind("/") + 1] if storage.is_url(name) else os.path.dirname(name)
    resolved = _resolve(uri, base)
    if (resolved != uri and not storage.is_url(resolved) and not uri.startswith("file://")
            and not os.path.lexists(resolved)):
        return dead_letter(resolved, f"cannot read file (file not found: {uri!r} from {name}:{line_no}; relative paths "
                                     f"in a manifest resolve against the manifest's folder "
                                     f"{os.path.abspath(base) or '.'}, not the working directory)", "read", ref_id,
                           columns)
    return ImageRef(resolved, ref_id, columns)


def _csv_header(name: str, text: str):
    """(the csv reader, positioned after the header; the header's names, stripped) of a CSV manifest,
    or (reader, None) for an empty one.

    Raises:
        ManifestError: the header cannot be read as CSV, or has no ``uri`` column.
    """
    rows = csv.reader(io.StringIO(text, newline=""))  # newline="": line numbers as an editor counts them
    try:
        header = next(rows, None)
    except csv.Error as e:
        raise ManifestError(f"CSV manifest {name}: its header line cannot be read as CSV ({e}); make the first line "
                            f"'uri' or 'uri,id'") from None
    if header is None:
        return rows, None  # no header: an empty manifest (the caller decides what that means)
    fields = [field.strip() for field in header]
    if "uri" not in fields:
        shown = ",".join(fields).encode("utf-8", "backslashreplace").decode("utf-8")  # may hold escaped bytes
        raise ManifestError(f"CSV manifest {name} has no 'uri' column (its header: {shown!r}); make the first line "
                            f"'uri' or 'uri,id'")
    return rows, fields


def _csv_entries(name: str, text: str, keep: Sequence[str] = ()) -> Iterator[object]:
    """The entries of a CSV manifest (see :func:`parse_manifest`), one record at a time, so a line the
    csv module cannot read is that line's dead letter."""
    rows, fields = _csv_header(name, text)
    if fields is None:
        return
    while True:
        start = rows.line_num + 1
        try:
            record = next(rows)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a field over csv.field_size_limit(); the reader goes on at the next line
            yield _bad_line(name, start, f"cannot be read as CSV ({e})", keep=keep)
            continue
        if not record:
            continue  # a blank line
        problem = _line_problem(name, "".join(record))
        if problem:
            yield _bad_line(name, start, *problem, keep=keep)
            continue
        row = dict(zip(fields, record))  # a short record lacks its last columns: they are None
        raw_uri = row.get("uri") or ""
        uri = raw_uri.strip()
        if not uri:
            yield _bad_line(name, start, "the 'uri' field is empty", keep=keep)
        elif "\n" in raw_uri or "\r" in raw_uri:
            yield _bad_line(name, start, f"the 'uri' field runs on to line {rows.line_num} (a double quote without "
                                         f"its closing quote?)", keep=keep)
        else:
            yield _entry(uri, (row.get("id") or "").strip() or None, name, start, keep, row)


def _jsonl_objects(name: str, text: str) -> Iterator[Tuple[int, Optional[dict], Optional[Tuple[str, str]]]]:
    """``(line number, object, None)`` per entry of a JSON Lines manifest, and ``(line number, None,
    (problem, fix))`` per non-blank line that cannot be one."""
    for line_no, line in enumerate(_LINE_BREAK.split(text), start=1):
        line = line.strip()
        if not line:
            continue
        problem = _line_problem(name, line)
        if problem:
            yield line_no, None, problem
            continue
        try:
            row = json.loads(line)
        except RecursionError:
            yield line_no, None, ("is JSON nested too deeply to read", _FIX_LINE)
            continue
        except ValueError as e:
            yield line_no, None, (f"is not valid JSON ({e})", _FIX_LINE)
            continue
        uri = row.get("uri") if isinstance(row, dict) else None
        if not isinstance(uri, str) or not uri.strip():
            yield line_no, None, ("has no string 'uri' field (each line is a JSON object with one)", _FIX_LINE)
            continue
        yield line_no, row, None


def parse_manifest(name: str, text: str, keep: Optional[Sequence[str]] = None) -> Iterator[object]:
    """Yields ``ImageRef`` per manifest entry, or a ``manifest`` dead-letter row for an unusable entry.

    Formats, by suffix: ``.txt`` one URI per line (blank lines and ``#`` comments
    skipped); ``.csv`` with a header holding ``uri`` and optionally ``id`` (names
    matched after stripping spaces); ``.jsonl``/``.ndjson`` objects with ``uri`` and
    optionally ``id`` (an id that is not a string is written as JSON). Relative paths
    resolve against the manifest's folder; ``file://`` URIs become local paths.

    A line that cannot name an input (bytes that are not UTF-8, a NUL byte, text the csv or json
    module cannot read, no ``uri``) is that line's dead letter, ``{"uri": "<manifest>:<line>"}``, with
    a reason naming the manifest, the line and the fix; every other line is still an input.

    Args:
        name: The manifest's path (its suffix says the format; relative entries resolve against its folder).
        text: Its text (:func:`read_manifest`).
        keep: The manifest's own columns to carry on each ref (``ImageRef.columns``), in this order:
            a CSV field exactly as the csv module reads it (not stripped, unlike ``uri`` and ``id``: its
            spaces may be data), a JSON string as it is, any other JSON value as its JSON text; a column
            an entry lacks (a short CSV row, a missing JSON key, null) is None. A bad line's dead letter
            carries every kept column as None. Default None: no columns (``ImageRef.columns`` is None).

    Raises:
        ManifestError: a CSV header without a ``uri`` column (no entry can be read).
    """
    keep = tuple(keep or ())
    lower = name.lower()
    if lower.endswith(".csv"):
        yield from _csv_entries(name, text, keep)
        return
    if lower.endswith((".jsonl", ".ndjson")):
        for line_no, row, problem in _jsonl_objects(name, text):
            if problem:
                yield _bad_line(name, line_no, *problem, keep=keep)
            else:
                yield _entry(row["uri"].strip(), row.get("id"), name, line_no, keep, row)
        return
    for line_no, line in enumerate(_LINE_BREAK.split(text), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        problem = _line_problem(name, line)
        if problem:
            yield _bad_line(name, line_no, *problem, keep=keep)
            continue
        yield _entry(line, None, name, line_no, keep)


def _holds_columns(path: str) -> bool:
    """``path`` is a manifest that can hold columns of its own (.csv, .jsonl)."""
    return is_manifest(path) and path.lower().endswith(COLUMN_SUFFIXES)


def _column_names(path: str, text: str) -> list:
    """Every column name of a CSV or JSON Lines manifest, ``uri`` and ``id`` included, as found: a CSV
    header's names stripped, in header order (empty and repeated ones too); a JSON Lines manifest's
    keys in first-seen order over its entries (lines that are not one are skipped)."""
    if path.lower().endswith(".csv"):
        return _csv_header(path, text)[1] or []
    return list(dict.fromkeys(key for _, row, _ in _jsonl_objects(path, text) if row for key in row))


def manifest_columns(path: str, text: Optional[str] = None) -> Tuple[str, ...]:
    """The columns a manifest has besides ``uri`` and ``id``, in order.

    CSV: the header's names, stripped as matching ``uri`` and ``id`` strips them, in header order (an
    empty or repeated name is listed as it is; :func:`resolve_keep_columns` refuses keeping one).
    JSON Lines: the keys of its entries in first-seen order over all lines; lines that are not an entry
    (not JSON, no ``uri``) are skipped. A ``.txt`` manifest and any input that is not a manifest: none.

    Args:
        path: ``--input``.
        text: The manifest's text, when the caller has read it. Default: read it (:func:`read_manifest`).

    Raises:
        ManifestError: the manifest cannot be read, or is a CSV without a ``uri`` column.
    """
    if not _holds_columns(path):
        return ()
    text = read_manifest(path) if text is None else text
    return tuple(name for name in _column_names(path, text) if name not in ("uri", "id"))


def split_keep_columns(value: Optional[str]) -> Optional[Tuple[str, ...]]:
    """``--keep_columns`` as names: None when the flag is not given (keep all), () for ``""`` (keep none),
    else the comma-separated names, stripped.

    Raises:
        ManifestError: an empty name (``a,,b``, a trailing comma) or a name given twice.
    """
    if value is None:
        return None
    if not value.strip():
        return ()
    names = tuple(name.strip() for name in value.split(","))
    if not all(names):
        raise ManifestError(f"--keep_columns {value!r} holds an empty name; list the columns to keep separated by "
                            f"commas (e.g. --keep_columns sku,shard), or pass --keep_columns '' to keep none")
    seen = set()
    for name in names:
        if name.lower() in seen:
            raise ManifestError(f"--keep_columns names {name!r} twice (column names are compared ignoring case, as "
                                f"BigQuery does); name each column once")
        seen.add(name.lower())
    return names


def _leave_out_hint(found: Sequence[str], reserved: Sequence[str]) -> str:
    """"(e.g. --keep_columns a,b)": the manifest's columns that can be kept as they are."""
    folded = [name.lower() for name in found]
    usable = [name for name in found if name and name.lower() not in reserved and folded.count(name.lower()) == 1]
    return f"(e.g. --keep_columns {','.join(usable)})" if usable else "(--keep_columns '' keeps none)"


def resolve_keep_columns(path: str, flag_value: Optional[str], reserved: Sequence[str] = ()) -> Tuple[str, ...]:
    """The manifest columns a run carries into its rows, from ``--keep_columns``; decided once, at start.

    Args:
        path: ``--input``.
        flag_value: ``--keep_columns``: None (not given) keeps all of :func:`manifest_columns`, ``""`` none,
            ``"a,b"`` exactly those, in that order.
        reserved: Field names the caller's rows gain besides :data:`RESERVED_COLUMNS` (the BigQuery run
            columns, output tensor names), refused as column names the same way. Default: none.

    Returns:
        The kept names, in order; () for an input that is not a CSV or JSON Lines manifest.

    Raises:
        ManifestError: ``--keep_columns`` naming a column the manifest lacks (the message lists those it
            has), given for an input that is not a .csv or .jsonl manifest, or holding an empty or repeated
            name; or a column that would be kept whose name is empty, repeated (ignoring case, as BigQuery
            compares names) or that of a field the job writes (:data:`RESERVED_COLUMNS`, ``reserved``). Each
            message says how to fix the manifest or what to pass to ``--keep_columns``.
    """
    requested = split_keep_columns(flag_value)
    if not _holds_columns(path):
        if requested:
            what = "a .txt manifest (one URI per line)" if is_manifest(path) else "not a manifest"
            raise ManifestError(f"--keep_columns {flag_value} needs a .csv or .jsonl manifest as --input (the "
                                f"manifest's columns are what it keeps); --input {path} is {what}: leave "
                                f"--keep_columns out")
        return ()
    if requested == ():
        return ()
    fields = _column_names(path, read_manifest(path))
    found = [name for name in fields if name not in ("uri", "id")]
    blocked = tuple(RESERVED_COLUMNS) + tuple(reserved)
    folded_blocked = {name.lower() for name in blocked}
    hint = _leave_out_hint(found, folded_blocked)
    if requested is not None:
        for name in requested:
            if name in ("uri", "id"):
                raise ManifestError(f"--keep_columns names {name!r}, which every row carries already; leave it out "
                                    f"{hint}")
        missing = [name for name in requested if name not in found]
        if missing:
            raise ManifestError(f"--keep_columns {flag_value}: manifest {path} has no column "
                                f"{', '.join(map(repr, missing))}; its columns (besides uri and id): "
                                f"{', '.join(found) or 'none'}")
    keep = requested if requested is not None else tuple(found)
    if "" in keep:
        where = (f"column {fields.index('') + 1} of its header has no name" if path.lower().endswith(".csv")
                 else 'its lines have a key with an empty name ("")')
        raise ManifestError(f"manifest {path}: {where}; name it in the manifest, or leave it out with --keep_columns "
                            f"{hint}")
    for name in keep:
        if name.lower() in folded_blocked:
            raise ManifestError(f"manifest {path}: its column {name!r} has the name of a field the job writes "
                                f"({', '.join(blocked)}); rename it in the manifest, or leave it out with "
                                f"--keep_columns {hint}")
    for name in keep:
        if found.count(name) > 1:
            raise ManifestError(f"manifest {path} names the column {name!r} twice; rename one in the manifest, or "
                                f"leave them out with --keep_columns {hint}")
        twins = [other for other in keep if other != name and other.lower() == name.lower()]
        if twins:
            raise ManifestError(f"manifest {path} has the columns {name!r} and {twins[0]!r}, one name when case is "
                                f"ignored (as BigQuery does); rename one in the manifest, or leave them out with "
                                f"--keep_columns {hint}")
    return keep


def check_manifest(path: str) -> None:
    """Fails when a manifest cannot be used at all: unreadable, no 'uri' column, no entries, or no entry
    that is UTF-8 (a file saved in another encoding, not one bad line).

    Raises:
        ManifestError: with what was found and the fix.
    """
    text = read_manifest(path)
    if next(parse_manifest(path, text), None) is None:
        raise ManifestError(f"manifest {path} lists no images (it is empty, or holds only blank lines, comments "
                            f"or a header); add one image path or URI per entry")
    undecoded = _UNDECODED.search(text)
    # Only a manifest with undecodable bytes is read to the end here: the job reads it again anyway.
    if undecoded and not any(isinstance(entry, ImageRef) for entry in parse_manifest(path, text)):
        line = text.count("\n", 0, undecoded.start()) + 1
        raise ManifestError(
            f"manifest {path} is not UTF-8 text (byte 0x{ord(undecoded.group()) - 0xDC00:02x} on line {line}); "
            f"re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {os.path.basename(path)} > "
            f"fixed{os.path.splitext(path)[1]}`")


def _literal_prefix(pattern: str) -> str:
    """The part of a glob before its first wildcard, with ``[x]`` escapes read as the literal ``x``."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[" and i + 2 < len(pattern) and pattern[i + 2] == "]" and pattern[i + 1] not in "!^":
            out.append(pattern[i + 1])
            i += 3
            continue
        if c in "*?[":
            break
        out.append(c)
        i += 1
    return "".join(out)


def unlistable_local_files(pattern: str) -> Iterator[tuple]:
    """Local inputs a glob names but Beam's listing skips: ``(path, dead-letter reason)``.

    Beam's local ``match`` silently drops entries whose size it cannot read (a
    symlink to a deleted file or to itself, a file removed while listing) and
    directories it cannot list (``os.walk`` ignores their errors). They are inputs
    all the same, so each becomes a dead letter.
    """
    if storage.is_url(pattern) or not has_glob(pattern):
        return  # no glob: a single path is checked at start (it must exist)
    prefix = _literal_prefix(pattern)
    root = prefix if prefix.endswith(os.sep) else os.path.dirname(prefix)
    matches = re.compile(FileSystem.translate_pattern(pattern)).match
    recursive = "**" in pattern
    unlistable = []

    def onerror(error: OSError):
        path = error.filename or root
        # A folder the pattern cannot reach into (``dir/*.jpg`` vs ``dir/sub/``) holds no inputs.
        if recursive or path.rstrip(os.sep).count(os.sep) < pattern.count(os.sep):
            unlistable.append((path, error))

    for dirpath, _, files in os.walk(root or ".", onerror=onerror):
        for name in files:
            path = os.path.join(dirpath, name)
            if not matches(path):
                continue
            try:
                os.path.getsize(path)
            except OSError as e:
                yield path, f"cannot read file ({describe_stat_error(path, e)})"
    for path, error in unlistable:
        yield path, (f"cannot list directory ({type(error).__name__}: {error.strerror or error}); its files were "
                     f"not scored: give the job's user read and execute permission on it")


def _printable(path: str) -> str:
    """A path holding bytes that are not UTF-8, with those bytes written as ``\\xe9``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _not_utf8_name(undecoded: "re.Match") -> str:
    """The dead-letter reason for a listed file whose name is not UTF-8.

    Such a name (from a system that writes Latin-1) cannot travel through Beam, which encodes text
    as UTF-8, nor into the outputs; it used to stop the job.
    """
    return (f"file name is not UTF-8 (byte 0x{ord(undecoded.group()) - 0xDC00:02x}), so it cannot be written in "
            f"the outputs; rename the file (e.g. `convmv -f latin1 -t utf-8 --notest FILE`)")


class _Match(beam.DoFn):
    """Pattern -> ``ImageRef`` per matched file, plus dead letters for what Beam's listing skips."""

    def setup(self):
        self._inputs = Metrics.counter(NAMESPACE, "inputs")
        self._unlistable = Metrics.counter(NAMESPACE, "unlistable_directories")

    def process(self, pattern: str):
        try:
            with warnings.catch_warnings():
                # An escaped '[' ("[[]") makes Beam's regex warn about a nested set; it matches right.
                warnings.simplefilter("ignore", FutureWarning)
                matched = FileSystems.match([pattern])[0].metadata_list
        except Exception as e:  # a listing failure is a broken setup: fail with the reason
            raise IOError(f"Cannot list {pattern}: {e}") from e
        for metadata in matched:
            self._inputs.inc()
            undecoded = _UNDECODED.search(metadata.path)
            if undecoded:
                yield dead_letter(_printable(metadata.path), _not_utf8_name(undecoded), "read")
                continue
            yield ImageRef(metadata.path)
        for path, reason in unlistable_local_files(pattern):
            self._inputs.inc()
            if reason.startswith("cannot list directory"):
                self._unlistable.inc()
            yield dead_letter(_printable(path), _printable(reason), "read")  # a reason may quote a link's target


class _ReadManifest(beam.DoFn):
    """Manifest path -> ``ImageRef`` per entry (carrying the ``keep`` columns), dead letters for bad lines."""

    def __init__(self, keep: Tuple[str, ...] = ()):
        self._keep = keep

    def setup(self):
        self._inputs = Metrics.counter(NAMESPACE, "inputs")

    def process(self, path: str):
        for entry in parse_manifest(path, read_manifest(path), self._keep):
            self._inputs.inc()  # every entry, usable or not, is an input that must end somewhere
            yield entry


def in_batches(outputs, size: Optional[int]):
    """Groups a DoFn's ``ImageRef`` outputs into lists of ``size`` (tagged outputs pass through)."""
    if not size:
        yield from outputs
        return
    batch = []
    for item in outputs:
        if isinstance(item, ImageRef):
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
        else:
            yield item
    if batch:
        yield batch


class _Batched(beam.DoFn):
    """Runs another listing DoFn and groups its refs into lists (one Beam element per batch)."""

    def __init__(self, inner: beam.DoFn, size: Optional[int]):
        self._inner = inner
        self._size = size

    def setup(self):
        self._inner.setup()

    def process(self, element):
        yield from in_batches(self._inner.process(element), self._size)


class ImageRefs(beam.PTransform):
    """Path, glob, directory or manifest -> ``ImageRef`` (+ ``dead_letter`` rows for bad manifest lines).

    The result is redistributed (``Reshuffle``) so reading and decoding spread over
    all workers instead of staying on the one that expanded the glob.

    Args:
        path: A glob (``gs://bucket/images/*.jpg``), a directory, or a manifest file.
        batch_size: Emit lists of this many refs instead of single refs, so no later step pays
            Beam's per-element cost per image (a 60,000-line manifest cost ~11 s of one core as
            single elements on the H100 host, benchmarks/NOTES.md). Default None: single refs.
        keep_columns: The manifest's columns each ref carries into its rows (:func:`resolve_keep_columns`,
            ``RunSettings.keep_columns``). Default (): none.

    Raises:
        ValueError: ``keep_columns`` for an input that is not a manifest (a bug: the flags were checked).
    """

    def __init__(self, path: str, batch_size: Optional[int] = None, keep_columns: Sequence[str] = ()):
        super().__init__()
        if keep_columns and not is_manifest(path):
            raise ValueError(f"keep_columns {list(keep_columns)} needs a manifest as input, got {path}")
        self._path = path
        self._batch_size = batch_size
        self._keep = tuple(keep_columns)

    def expand(self, pbegin):
        if is_manifest(self._path):
            read = _Batched(_ReadManifest(self._keep), self._batch_size)
            parsed = (pbegin | "Manifest" >> beam.Create([self._path])
                      | "ParseManifest" >> beam.ParDo(read).with_outputs(DEAD_LETTER, main="refs"))
            refs, bad = parsed.refs, parsed[DEAD_LETTER]
        else:
            matched = (pbegin | "Pattern" >> beam.Create([normalize_pattern(self._path)])
                       | "Match" >> beam.ParDo(_Batched(_Match(), self._batch_size)).with_outputs(
                           DEAD_LETTER, main="refs"))
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
        pixels: (n, height, width, 3) uint8 decoded on the CPU (Pillow), or None.
        encoded: Encoded files for the GPU decoder (``--decode gpu``), one per remaining ref.
        boxes: For each encoded file, the source region resize-and-crop keeps
            (``images.pillow_decoder.crop_box`` of its header size), so the GPU crops exactly as Pillow.
        scoring: Its scoring, started by the reader as soon as its files were read
            (:class:`transforms.ahead.Started`), or None. It stays in this process: pickling drops it, and
            a batch without it is scored by ``RunInference``.
    """

    refs: Tuple[ImageRef, ...]
    pixels: Optional[np.ndarray] = None
    encoded: Tuple[bytes, ...] = ()
    boxes: Tuple[Tuple[float, float, float, float], ...] = ()
    #: Not an argument: ``dataclasses.replace`` makes a batch of other content, which must not carry it.
    scoring: Optional[object] = dataclasses.field(default=None, init=False, compare=False, repr=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["scoring"] = None  # a future and a scorer of this process: elsewhere the batch is scored anew
        return state

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def decoded_count(self) -> int:
        return 0 if self.pixels is None else len(self.pixels)

    @property
    def nbytes(self) -> int:
        return (0 if self.pixels is None else self.pixels.nbytes) + sum(len(e) for e in self.encoded)


class ImageBatchCoder(beam.coders.Coder):
    """Pickles an :class:`ImageBatch` where a runner moves one between processes, and sizes it from its
    ``nbytes`` without pickling it.

    Beam samples the size of a PCollection's elements by encoding them with its coder (every one of the first
    ten, then fewer: ~47 of 391 batches at 100,000 images, for each PCollection a batch passes); pickling
    a batch copies its ~11 MB of files on the bundle thread, the thread every image waits for.
    """

    def encode(self, value) -> bytes:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes):
        return pickle.loads(encoded)

    def estimate_size(self, value) -> int:
        if isinstance(value, ImageBatch):
            return value.nbytes
        return len(self.encode(value))

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return ImageBatch

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))


beam.coders.registry.register_coder(ImageBatch, ImageBatchCoder)


#: Threads reading local files for the GPU decoder (GIL-bound Python: more threads only convoy).
LOCAL_GPU_READERS = 2


def batch_of(refs: Sequence[ImageRef], loaded: Sequence[Decoded]) -> Optional[ImageBatch]:
    """The :class:`ImageBatch` of one read batch's results (one per ref, in order): the CPU-decoded rows
    first, then the encoded files; None when every image failed (their dead letters say why)."""
    decoded, encoded = [], []
    for ref, result in zip(refs, loaded):
        if result.error is not None:
            continue
        if result.encoded is not None:
            encoded.append((ref, result.encoded, result.box))
        else:
            decoded.append((ref, result.array))
    if not decoded and not encoded:
        return None
    pixels = np.stack([array for _, array in decoded]) if decoded else None
    return ImageBatch(tuple(ref for ref, _ in decoded) + tuple(ref for ref, _, _ in encoded),
                      pixels, tuple(data for _, data, _ in encoded), tuple(box for _, _, box in encoded))


def _same_objects(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class _Ahead:
    """A batch whose reads are being watched (``ReadImageBatches._start_when_read``).

    Shared state: the count of chunks still being read and whether any read failed (both locked); ``made``
    is set once, by the thread that read the last chunk, to ``(the results, the batch made of them)``, before
    it sets ``settled``; the bundle thread reads it only after ``settled``.
    """

    def __init__(self, chunks: int):
        self._left = chunks
        self._failed = False
        self._lock = threading.Lock()
        self.settled = threading.Event()
        self.made = None

    def count_down(self, failed: bool) -> Optional[bool]:
        """Counts one chunk read (``failed``: its task raised or was cancelled). For the last chunk, whether any
        chunk's task failed; None for the others."""
        with self._lock:
            self._left -= 1
            self._failed = self._failed or failed
            return self._failed if self._left == 0 else None


class _Chunk:
    """Part of a batch read by one pool task; results grow as its reads finish, or all at once when its
    files are read ``together`` (:func:`images.reading.load_local_batch`)."""

    def __init__(self, refs, together: bool = False):
        self.refs = list(refs)
        self.together = together
        self.results: list = []
        self.progress = 0  # files settled so far, as the watchdog (_collect) sees them; under `lock`
        self.read_again = 0  # files read again alone (load_local_batch's fell_back); under `lock`
        self.abandoned = False
        self.lock = threading.Lock()

    def advance(self) -> None:
        with self.lock:
            self.progress += 1


class ReadImageBatches(beam.DoFn):
    """Reads (and, on the CPU path, decodes) a batch of images: ``[ImageRef] -> ImageBatch``.

    Each image is read, pre-screened and - unless it goes to the GPU decoder - decoded by a
    thread pool (file reads, Pillow and ``gs://`` I/O release the GIL), so ``gs://`` latency
    is hidden and up to ``prefetch`` batches are being read while this DoFn's thread runs the
    current one through the engine downstream. Every image that cannot be read or decoded is
    a ``dead_letter`` row; the rest of its batch goes on. Handling whole batches keeps Beam's
    per-element cost off each image (Beam alone tops out near 4,300 elements/s on the H100 host).

    Args:
        config: Preprocessing sizes and limits.
        gpu_decode: Images the header pre-screen passes are left encoded for the DALI decoder beside
            the engine (``--decode gpu`` or ``dali_cpu``); the rest are decoded here, as on the CPU
            path. Default False.
        threads: Reader threads per DoFn instance; -1 = the worker's cores (at most 16), 0 = read
            inline in the bundle's thread. Default -1.
        prefetch: Batches in flight per DoFn instance. Default 2.
        read_timeout_s: A read that makes no progress for this long becomes a ``read`` dead
            letter and the rest of its chunk is read by another thread; None = no limit.
            Default 60.
        score_ahead: The token under which the job's model handler registers the scorer it loads
            (``transforms.ahead``): each batch starts scoring on it as soon as its files are read, on the
            reader thread that read its last file, instead of when ``RunInference`` reaches it. "" = off.
            Default "".
    """

    def __init__(self, config: PreprocessConfig, gpu_decode: bool = False, threads: int = -1, prefetch: int = 2,
                 read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S, score_ahead: str = ""):
        if threads < -1 or prefetch < 1:
            raise ValueError(f"need threads >= -1 and prefetch >= 1, got {threads}, {prefetch}")
        self._config = config
        self._gpu_decode = gpu_decode
        self._threads = threads
        self._prefetch = prefetch
        self._read_timeout_s = read_timeout_s
        self._score_ahead = score_ahead

    def setup(self):
        self._read_us = stage_distribution("read")
        self._decode_us = stage_distribution("decode")
        self._decoded = Metrics.counter(NAMESPACE, "images_decoded")
        self._started = Metrics.counter(NAMESPACE, "batches_started_ahead")
        self._bytes = Metrics.counter(NAMESPACE, "bytes_read")
        self._alone = Metrics.counter(NAMESPACE, "files_read_again_alone")
        self._logged_fallback = False
        self._pool = self._local_pool = self._together = None
        threads = min(16, os.cpu_count() or 1) if self._threads == -1 else self._threads
        self._threads_n = threads
        if threads:
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="read")
            if self._gpu_decode:
                self._local_pool = concurrent.futures.ThreadPoolExecutor(
                    min(LOCAL_GPU_READERS, threads), thread_name_prefix="read-local")
                self._together = DaliFileReader()
        self._pending = collections.deque()

    def start_bundle(self):
        self._pending = collections.deque()

    def _load(self, ref: ImageRef, timeout_s: Optional[float] = None):
        return load_image(ref.uri, self._config, self._gpu_decode, timeout_s)

    def _fell_back(self, chunk: "_Chunk", files: int, reason: str) -> None:
        """Notes files of ``chunk`` read again alone, on the reader thread: the count goes to the job's metrics
        from the bundle thread (:meth:`_collect`), since Beam keeps only metrics updated on the thread running
        the bundle. ``_logged_fallback`` is unlocked: a race costs at most a second INFO line."""
        with chunk.lock:
            chunk.read_again += files
        _LOG.log(logging.DEBUG if self._logged_fallback else logging.INFO,
                 "%d file(s) read together are read again one at a time: %s", files, reason)
        self._logged_fallback = True

    def _load_chunk(self, chunk: "_Chunk") -> None:
        if chunk.abandoned:  # given up while it waited for a thread: _collect reads its files another way
            return
        if chunk.together:
            results = load_local_batch([ref.uri for ref in chunk.refs], self._config, self._together,
                                       self._gpu_decode, [ref.size for ref in chunk.refs], chunk.advance,
                                       lambda files, reason: self._fell_back(chunk, files, reason))
            with chunk.lock:
                if not chunk.abandoned:
                    chunk.results.extend(results)
            return
        for ref in chunk.refs:
            result = self._load(ref)  # inline read (tracked in IN_FLIGHT); _collect watches the chunk
            with chunk.lock:
                if chunk.abandoned:
                    return
                chunk.results.append(result)
                chunk.progress += 1

    def _tasks(self, refs):
        """(pool, tasks, whether each task reads its files together) for one batch.

        Decoding on the CPU (Pillow releases the GIL) and remote reads (latency) want every
        thread. Local files for the GPU decoder go to a pool of :data:`LOCAL_GPU_READERS` threads, a
        whole batch per task, however many batches are in flight, and each task has DALI read its
        files together (:func:`images.reading.load_local_batch`): one file at a time, every system call
        lets go of the GIL and must win it back from the bundle thread, which made each 43 KB read take
        0.5-2.6 ms on 16 cores against 20 us alone (benchmarks/NOTES.md).
        """
        if self._local_pool is not None and not any(storage.is_url(ref.uri) for ref in refs):
            return self._local_pool, 1, True
        return self._pool, self._threads_n, False

    def _emit(self, refs, loaded, window=None, timestamp=None, batch: Optional[ImageBatch] = None):
        """The dead letters and the batch of one read batch; ``batch`` is the one :func:`batch_of` made of
        these very results when its reads finished (and whose scoring may have started), or None."""
        def windowed(value):
            return value if window is None else WindowedValue(value, timestamp, [window])

        read_us = decode_us = nbytes = decoded = 0
        for ref, result in zip(refs, loaded):
            read_us += int(result.read_s * 1e6)
            if result.stage == "decode":
                nbytes += result.nbytes
                if result.encoded is None:
                    decode_us += int(result.decode_s * 1e6)
            if result.error is not None:
                out = ref_dead_letter(ref, result.error, result.stage)
                yield beam.pvalue.TaggedOutput(out.tag, windowed(out.value))
            elif result.encoded is None:
                decoded += 1
        # One metric update per batch, not per image: the stage sums are what stats.json reads.
        self._read_us.update(read_us)
        self._bytes.inc(nbytes)
        if decode_us:
            self._decode_us.update(decode_us)
        if decoded:
            self._decoded.inc(decoded)
        if batch is None:
            batch = batch_of(refs, loaded)
        if batch is not None:
            if batch.scoring is not None:
                self._started.inc()
            yield windowed(batch)

    def _start_when_read(self, refs, chunks, futures) -> "_Ahead":
        """Once every chunk of a batch is read, makes its :class:`ImageBatch` and starts scoring it
        (``transforms.ahead``), on the thread that finished the last chunk."""
        ahead = _Ahead(len(futures))

        # The callback sees only its own future: each future keeps its done callbacks, so a closure over the
        # list of futures is a cycle, and the batch's file bytes, results and started scoring would wait for
        # the garbage collector (a full collection then holds the GIL ~0.15 s) instead of going with the batch.
        def finished(future) -> None:
            try:
                failed = future.cancelled() or future.exception() is not None
            except Exception:  # counted whatever happens: the bundle thread waits for `settled`
                failed = True
            any_failed = ahead.count_down(failed)
            if any_failed is None:
                return
            try:
                if any_failed or any(c.abandoned for c in chunks):
                    return  # _collect gives the reads their outcome; RunInference scores what they make
                loaded = [result for chunk in chunks for result in chunk.results]
                if len(loaded) != len(refs):
                    return
                batch = batch_of(refs, loaded)
                if batch is not None:
                    batch.scoring = start_ahead(self._score_ahead, batch)
                ahead.made = (loaded, batch)
            except Exception as e:  # never a reader's failure: the batch is made and scored as before
                _LOG.debug("could not start a batch's scoring when read: %r", e)
            finally:
                ahead.settled.set()

        for future in futures:
            future.add_done_callback(finished)
        return ahead

    def process(self, refs, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        refs = list(refs)
        if self._pool is None:
            yield from self._emit(refs, [self._load(ref, self._read_timeout_s) for ref in refs])
            return
        pool, tasks, together = self._tasks(refs)
        size = -(-len(refs) // tasks)
        chunks = [_Chunk(refs[i:i + size], together) for i in range(0, len(refs), size)]
        futures = [pool.submit(self._load_chunk, chunk) for chunk in chunks]
        ahead = self._start_when_read(refs, chunks, futures) if self._score_ahead else None
        self._pending.append((refs, list(zip(chunks, futures)), window, timestamp, ahead))
        # Emit finished batches in order; block only when more than `prefetch` are in flight.
        while self._pending and (len(self._pending) > self._prefetch
                                 or all(f.done() for _, f in self._pending[0][1])):
            yield from self._emit_pending()

    def _collect(self, chunk: "_Chunk", future) -> list:
        """A chunk's results; a read stalled for ``read_timeout_s`` becomes a dead letter.

        Python cannot interrupt a thread blocked in a read, so the stalled thread is left behind
        (the pool loses it) and the rest of the chunk goes to another one. One watchdog per
        chunk rather than a thread per read keeps the fast path cheap. A chunk read together shows
        no progress until all of it is read, so which file stalled is unknown: the whole chunk is read
        again one file at a time, where a file that stalls again is the one named.
        """
        import concurrent.futures

        while True:
            seen = chunk.progress
            try:
                future.result(timeout=self._read_timeout_s or None)
                if chunk.read_again:
                    self._alone.inc(chunk.read_again)
                return chunk.results
            except concurrent.futures.TimeoutError:
                with chunk.lock:
                    if chunk.progress != seen:
                        continue  # slow but moving
                    chunk.abandoned = True
                    done = list(chunk.results)
                if chunk.together:
                    self._alone.inc(len(chunk.refs))
                    _LOG.warning("reading %d files together (from %s) made no progress for %s s; reading them again "
                                 "one at a time", len(chunk.refs), chunk.refs[0].uri, self._read_timeout_s)
                    alone = _Chunk(chunk.refs)
                    return self._collect(alone, self._pool.submit(self._load_chunk, alone))
                stuck = chunk.refs[len(done)]
                _LOG.warning("read of %s made no progress for %s s; it becomes a dead letter", stuck.uri,
                             self._read_timeout_s)
                timed_out = Decoded(None, f"cannot read file ({read_timeout_reason(self._read_timeout_s)})", "read",
                                    float(self._read_timeout_s), 0.0, 0)
                rest = _Chunk(chunk.refs[len(done) + 1:])
                tail = self._collect(rest, self._pool.submit(self._load_chunk, rest)) if rest.refs else []
                return done + [timed_out] + tail

    def _emit_pending(self):
        done, chunks, w, ts, ahead = self._pending.popleft()
        loaded = [result for chunk, f in chunks for result in self._collect(chunk, f)]
        if ahead is not None and all(f.done() for _, f in chunks):
            # A future's result is visible before its done callbacks have run: wait for the last one's.
            ahead.settled.wait()
        made = ahead.made if ahead is not None else None
        # The batch made when its reads finished, only if made of exactly these results (a read that
        # timed out gives others): its scoring, if started, is then this batch's.
        batch = made[1] if made is not None and _same_objects(made[0], loaded) else None
        if batch is None and made is not None and made[1] is not None and made[1].scoring is not None:
            self._started.inc()  # started and not emitted: counted, as work RunInference does again
        yield from self._emit(done, loaded, w, ts, batch)

    def finish_bundle(self):
        while self._pending:
            yield from self._emit_pending()

    def teardown(self):
        for pool in (self._pool, self._local_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
