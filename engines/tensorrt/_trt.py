"""The one place that imports TensorRT, plus the logger that captures its messages.

TensorRT is an optional, heavy dependency: nothing in this package imports it at
module level. :func:`import_tensorrt` picks the full ``tensorrt`` module (builder,
ONNX parser, runtime) or, where only running is needed, falls back to the lean
runtime ``tensorrt_lean`` (pip ``tensorrt-lean-cu13``), which runs version-compatible
plans only. See docs/tensorrt.md ("TensorRT facts") for the API facts.
"""

from __future__ import annotations

import collections
import importlib
import threading
from typing import List, Optional, Tuple

from engines.base import EngineError

INSTALL_HINT = ("Use the image built from Dockerfile (docs/tensorrt.md), or pip install tensorrt "
                "(tensorrt-lean-cu13 is enough to run version-compatible plans).")

#: The TensorRT major versions this project supports (docs/tensorrt.md, "TensorRT facts": nothing from 8.x).
SUPPORTED_MAJORS = (10, 11)

#: Most messages a capturing logger keeps: it lives as long as the engine, so it must not grow.
MAX_MESSAGES = 200

_LOGGERS = {}  # id(trt.ILogger) -> the process-wide capturing logger for that module
_LOCK = threading.Lock()


def import_tensorrt(lean_ok: bool = False):
    """Imports TensorRT.

    Args:
        lean_ok: Accept the lean runtime ``tensorrt_lean`` when the full ``tensorrt``
            module is missing (enough to deserialize and run version-compatible plans;
            it has no Builder or OnnxParser). Default False.

    Returns:
        The ``tensorrt`` (or ``tensorrt_lean``) module.

    Raises:
        ImportError: neither module is importable; the message names the fix.
        EngineError: the installed TensorRT is a version this project does not support.
    """
    names = ("tensorrt", "tensorrt_lean") if lean_ok else ("tensorrt",)
    errors = []
    for name in names:
        try:
            trt = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        major = version_tuple(trt)[0]
        if major not in SUPPORTED_MAJORS:
            raise EngineError(f"{name} {trt.__version__} is not supported; this project needs TensorRT "
                              f"{' or '.join(f'{m}.x' for m in SUPPORTED_MAJORS)}. {INSTALL_HINT}")
        return trt
    what = " or ".join(names)
    raise ImportError(f"TensorRT is not importable ({'; '.join(errors)}); needed: {what}. {INSTALL_HINT}")


def version_tuple(trt) -> Tuple[int, ...]:
    """``trt.__version__`` ("10.11.0.33") as integers."""
    parts = []
    for piece in str(trt.__version__).split(".")[:4]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def is_lean(trt) -> bool:
    """True for the lean runtime module (no builder, runs version-compatible plans only)."""
    return getattr(trt, "__name__", "").startswith("tensorrt_lean")


def capturing_logger(trt, min_severity: str = "WARNING"):
    """Returns the process-wide ``trt.ILogger`` for ``trt`` that keeps its last messages.

    TensorRT reports why a parse, build or deserialization failed only through its
    logger (``build_serialized_network`` and ``deserialize_cuda_engine`` just return
    None), so the messages are kept and put into the :class:`EngineError` we raise.

    One logger per process and module, never one per engine or build: TensorRT keeps
    the first logger it is given as its global logger ("The logger passed into
    createInferRuntime differs from one already provided ..."), so a second logger would
    miss messages routed to the global one, and a freed first logger would leave TensorRT
    a dangling pointer. This one lives as long as the process. Several engines, builds
    and threads share it, so callers take a :meth:`mark` before each operation whose
    failure they report and read ``text(since=mark)``. Only the last
    :data:`MAX_MESSAGES` are kept.

    Args:
        trt: The module from :func:`import_tensorrt`.
        min_severity: "INTERNAL_ERROR", "ERROR", "WARNING", "INFO" or "VERBOSE". The shared
            logger keeps the most verbose level any caller asked for. Default "WARNING".
    """
    with _LOCK:
        logger = _LOGGERS.get(id(trt.ILogger))
        if logger is None:
            logger = _make_logger_class(trt)(min_severity)
            _LOGGERS[id(trt.ILogger)] = logger
        else:
            logger.include(min_severity)
    return logger


def _make_logger_class(trt):
    # The subclass must derive from the bindings' ILogger, which exists only once TensorRT is
    # imported, hence a class made at run time (the pattern of TensorRT's own Python samples).
    import logging

    py_log = logging.getLogger("engines.tensorrt.trt")
    levels = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING,
              "INFO": logging.INFO, "VERBOSE": logging.DEBUG}

    class CapturingLogger(trt.ILogger):
        """Keeps TensorRT's last messages (``.messages``) and forwards them to Python logging."""

        def __init__(self, min_severity: str = "WARNING"):
            trt.ILogger.__init__(self)
            if min_severity not in levels:
                raise EngineError(f"min_severity must be one of {list(levels)}, got {min_severity!r}")
            self._min = int(getattr(trt.ILogger.Severity, min_severity))
            # (sequence number, severity, message); the sequence numbers let concurrent
            # callers (one per execution context) read only what came after their mark().
            self._messages: "collections.deque[Tuple[int, str, str]]" = collections.deque(maxlen=MAX_MESSAGES)
            self._seq = 0
            self._lock = threading.Lock()

        def include(self, min_severity: str) -> None:
            """Also keeps messages down to ``min_severity`` (never makes the logger quieter)."""
            if min_severity not in levels:
                raise EngineError(f"min_severity must be one of {list(levels)}, got {min_severity!r}")
            self._min = max(self._min, int(getattr(trt.ILogger.Severity, min_severity)))

        def log(self, severity, msg):  # called by TensorRT, maybe from its own threads
            if int(severity) > self._min:  # lower value = more severe
                return
            name = getattr(severity, "name", str(severity))
            with self._lock:
                self._messages.append((self._seq, name, str(msg)))
                self._seq += 1
            py_log.log(levels.get(name, logging.INFO), "%s", msg)

        @property
        def messages(self) -> List[Tuple[str, str]]:
            with self._lock:
                return [(sev, msg) for _, sev, msg in self._messages]

        def clear(self) -> None:
            """Forgets every kept message (tests; shared users take a :meth:`mark` instead)."""
            with self._lock:
                self._messages.clear()

        def mark(self) -> int:
            """A position for :meth:`text` ``(since=...)``: messages logged from now on.

            The logger is shared by every engine, build and thread of the process, so
            one caller never erases another's messages; each reads only its own span.
            """
            with self._lock:
                return self._seq

        def text(self, limit: int = 20, since: Optional[int] = None) -> str:
            """The last ``limit`` messages (those logged after ``since``, if given) as one string."""
            with self._lock:
                kept = [(sev, msg) for seq, sev, msg in self._messages if since is None or seq >= since]
            kept = kept[-limit:]
            if not kept:
                return "(TensorRT logged nothing)"
            return " | ".join(f"[{sev}] {msg}" for sev, msg in kept)

    return CapturingLogger
