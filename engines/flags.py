"""Command-line pieces the engines and the pipeline share: range tables and their one check.

Each engine module adds its own flags (``add_flags(parser)``) and lists their bounds in a
``FLAG_RANGES`` table of :class:`FlagRange`; ``pipelines/settings.py`` lists the pipeline's own.
Every table is checked at start by :func:`check_ranges`, whatever ``--engine`` is, so a typo in any
flag stops the command with one line naming the flag, the value and the accepted range.
No Beam, no engine library: reading this module costs nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Union

from engines.base import UsageError

Number = Union[int, float]

#: Largest batch (--batch_size, --min_batch_size, a --trt_profile size): 2**20 images of 224x224x3
#: are 147 GiB of uint8 pixels before any activation, more than any GPU or worker holds.
MAX_BATCH = 1 << 20
#: Most threads or sessions per process: each thread reserves a stack (8 MiB by default on Linux) and the
#: work is bound by the cores long before; thousands exhaust the process's memory or thread limit.
MAX_THREADS = 1024
#: Most engine copies or TensorRT contexts: copies are one per GPU (no machine has 64) and each context
#: holds its own activation memory (2 or 3 already overlap copies and compute).
MAX_COPIES = 64

#: What ``--precision`` takes, whatever the engine.
PRECISIONS = ("fp32", "fp16")

#: Why the bounds above end where they do, as the error messages say it.
BATCH_WHY = "a batch this large holds more pixels than any GPU or worker"
THREADS_WHY = "each thread reserves a stack; the cores bound the work long before"


@dataclasses.dataclass(frozen=True)
class FlagRange:
    """The accepted values of one numeric flag.

    Attributes:
        flag: The flag as typed, e.g. "--batch_size".
        dest: Its attribute on the parsed options, e.g. "batch_size".
        least: Smallest accepted value.
        most: Largest accepted value.
        why: Why the range ends at ``most`` (said when a value is above it).
    """

    flag: str
    dest: str
    least: Number
    most: Number
    why: str


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """The ONNX model an engine's flags name, which the launcher reads before anything runs.

    Attributes:
        path: Local path or URL of the model.
        flag: The flag that names it ("--model", "--onnx_path"), for error messages.
    """

    path: str
    flag: str


@dataclasses.dataclass(frozen=True)
class FlagDefaults:
    """Values an engine chooses, for a run on this machine, for flags the user left out.

    Attributes:
        values: Option name (argparse ``dest``) -> value, of the engine's own flags.
        shown: The same values as flags, for the log line and stats.json, e.g.
            "--ort_sessions 2 --intra_op_threads 8".
        callers: Concurrent calls the engine is set up for with these values; a local runner runs
            that many bundle threads to make them. Default 1.
    """

    values: Mapping[str, Any]
    shown: str
    callers: int = 1


def show(value: Number) -> str:
    """A flag value as the user would type it (``1e+12``, ``0.5``, ``64``)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_range(flag: str, value, least: Number, most: Number, why: str) -> None:
    """Refuses a value outside ``least..most`` (None is a flag left at its default).

    Raises:
        UsageError: naming the flag, the value, the accepted range and why it ends there.
    """
    if value is None or least <= value <= most:  # NaN fails both comparisons: refused too
        return
    accepted = f"accepted: {show(least)} to {show(most)}"
    if value != value:
        raise UsageError(f"{flag} must be a number, got nan ({accepted})")
    if value < least:
        raise UsageError(f"{flag} must be >= {show(least)}, got {show(value)} ({accepted})")
    raise UsageError(f"{flag} must be <= {show(most)}, got {show(value)} ({accepted}; {why})")


def check_ranges(options: Any, ranges: Iterable[FlagRange]) -> None:
    """Checks every flag of a :class:`FlagRange` table on the parsed options (read by attribute).

    Raises:
        UsageError: for the first flag out of its range (see :func:`check_range`).
    """
    for rule in ranges:
        check_range(rule.flag, getattr(options, rule.dest), rule.least, rule.most, rule.why)
