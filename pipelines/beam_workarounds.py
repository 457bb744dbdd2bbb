"""Workarounds for Apache Beam defects that break a local job's output or cost its launch seconds, applied by
the job when it runs (never at import time), each with the Beam source that forces it and a test that fails
without it (tests/test_beam_workarounds.py).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading

_LOG = logging.getLogger(__name__)


def whole_elements_on_the_data_plane() -> bool:
    """Turns off the time-based flush of the gRPC data channels of the DirectRunner's SDK workers.

    Why: ``--direct_running_mode multi_threading`` runs its SDK workers in this process and talks to them
    over gRPC with ``data_buffer_time_limit_ms`` = ``worker_handlers.DATA_BUFFER_TIME_LIMIT_MS`` (1000 ms,
    ``apache_beam/runners/portability/fn_api_runner/worker_handlers.py``; the runner's own data servicer
    uses the same constant, in ``multi_processing`` too). Each output stream then gets a thread that flushes
    its buffer every second (``TimeBasedBufferingClosableOutputStream`` in
    ``apache_beam/runners/worker/data_plane.py``) without holding the lock its writer would need: a flush in
    the middle of an element's encoding sends the element in two messages, and the runner decodes each
    message alone. A 200,000-image job with 8 bundle threads on a GPU failed that way after its rows were
    scored (``NotImplementedError: Invalid PaneInfoEncoding`` in ``GroupingBuffer.append``), as Beam's own
    multi-worker gRPC tests did (https://github.com/apache/beam/issues/21104); in this project's test of it the
    pieces were also decoded as other elements, giving a GroupByKey wrong groups with no error at all, and a
    write between the flush's ``get()`` and ``_clear()`` would lose bytes instead. With 0 the streams flush by
    size only, at element boundaries (``maybe_flush``) and when the bundle ends, which is Beam's default for
    every other SDK harness (``_DEFAULT_TIME_FLUSH_THRESHOLD_MS = 0``); a batch job loses nothing by it. It also
    spares the one flusher thread per output stream per bundle (about 900 threads in a 20,000-image job).

    Process-wide and idempotent: a module constant read when the runner starts its workers; a job in this
    process sets it before its pipeline runs.

    Returns:
        True when this call changed the setting, False when it was off already or this Beam has no such
        constant (then nothing is changed and the reason is logged).
    """
    try:
        from apache_beam.runners.portability.fn_api_runner import worker_handlers
    except ImportError as e:  # a Beam without the FnApiRunner: nothing to turn off
        _LOG.info("no FnApiRunner worker handlers to set (%s)", e)
        return False
    if not hasattr(worker_handlers, "DATA_BUFFER_TIME_LIMIT_MS"):
        _LOG.warning("this Beam's worker_handlers has no DATA_BUFFER_TIME_LIMIT_MS: the time-based flush of the "
                     "DirectRunner's data channels is left as it is (see pipelines/beam_workarounds.py)")
        return False
    if worker_handlers.DATA_BUFFER_TIME_LIMIT_MS == 0:
        return False
    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = 0
    return True


#: The environment variables ``gettext.find`` reads the languages from, in its order.
_LOCALE_VARIABLES = ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG")


def cache_translation_lookups() -> bool:
    """Answers ``gettext.find`` from a cache, so the files it looks for are looked for once per process.

    Why: Beam builds a new ``argparse`` parser of every registered option each time a pipeline option view is
    taken (``PipelineOptions.view_as`` -> ``PipelineOptions.__init__`` in
    ``apache_beam/options/pipeline_options.py``), and ``Pipeline.apply`` takes one for every transform applied.
    Each parser looks up argparse's message catalogs (``gettext.translation`` -> ``gettext.find``, which checks
    a file for each language of the environment and has no cache of its own). On the H100 host, where a missing
    file costs a slow ``stat``, those lookups took 1.9 s of the launching thread of a one-GPU job, before its
    first image, while the model loaded beside it (a py-spy profile, benchmarks/NOTES.md). The answer depends
    only on the arguments, the locale variables (part of the key) and which catalogs are installed, which does
    not change while a job runs.

    Process-wide and idempotent (``gettext.find`` is replaced once; ``functools.lru_cache`` is thread-safe).

    Returns:
        True when this call installed the cache, False when it was installed already.
    """
    import gettext

    if getattr(gettext.find, "_cached_lookups", False):
        return False
    uncached = gettext.find

    @functools.lru_cache(maxsize=256)
    def lookup(domain, localedir, languages, all, environment):
        found = uncached(domain, localedir, list(languages) if languages is not None else None, all)
        return tuple(found) if isinstance(found, list) else found

    def find(domain, localedir=None, languages=None, all=False):
        found = lookup(domain, localedir, tuple(languages) if languages is not None else None, bool(all),
                       tuple(os.environ.get(name) for name in _LOCALE_VARIABLES))
        return list(found) if isinstance(found, tuple) else found

    find._cached_lookups = True
    find._uncached = uncached
    find.__doc__ = uncached.__doc__
    gettext.find = find
    return True


def _close(handler) -> None:
    """One worker handler's ``close``, its failure logged as Beam's ``close_all`` logs it, on Beam's logger."""
    try:
        handler.close()
    except Exception:
        logging.getLogger("apache_beam.runners.portability.fn_api_runner.worker_handlers").error(
            "Error closing worker_handler %s", handler, exc_info=True)


def stop_workers_together() -> bool:
    """Makes a local job stop its SDK worker processes all at once when it ends, not one after another.

    Why: the DirectRunner's ``WorkerHandlerManager.close_all`` (``apache_beam/runners/portability/fn_api_runner/
    worker_handlers.py``) closes each worker handler in turn, and a ``SubprocessSdkWorkerHandler``'s ``close``
    tells its worker process to stop and then waits for the process to end (``stop_worker`` joins the thread
    that waits on it) before the next worker is told. A job's exit then waits for the sum of its workers'
    exits. A worker that held a GPU tears down its DALI pipeline, its ONNX Runtime or TensorRT session and its
    CUDA context as it exits, so four SDK processes on one GPU left 4.6-5.2 s between the last image and the
    end of the job, one process 1.1 s; on the 2-core VM four CPU workers' closes took 0.32-0.42 s each, 1.40 s
    in all (benchmarks/NOTES.md). Here the handlers of worker processes are closed each on its own thread and
    waited for together; then Beam's ``close_all`` runs as before on what is left (the handlers of workers in
    this process, the gRPC server). Telling a worker to stop still takes Beam's one lock of control connections
    in turn (milliseconds: it ends when the worker closes its stream); what overlaps is the slow part after it,
    each worker's teardown and exit. A worker that never exits still hangs the job's end, as it did before.

    Process-wide and idempotent (``close_all`` is replaced once; each call works on its own manager's handlers).

    Returns:
        True when this call installed it, False when it was installed already or this Beam has no such
        manager (then nothing is changed and the reason is logged).
    """
    try:
        from apache_beam.runners.portability.fn_api_runner import worker_handlers
    except ImportError as e:  # a Beam without the FnApiRunner: nothing to change
        _LOG.info("no FnApiRunner worker handlers to change (%s)", e)
        return False
    manager = getattr(worker_handlers, "WorkerHandlerManager", None)
    subprocess_handler = getattr(worker_handlers, "SubprocessSdkWorkerHandler", None)
    if manager is None or subprocess_handler is None or not hasattr(manager, "close_all"):
        _LOG.warning("this Beam's worker_handlers has no WorkerHandlerManager.close_all or SubprocessSdkWorkerHandler: "
                     "a local job's SDK workers are stopped one after another (see pipelines/beam_workarounds.py)")
        return False
    if getattr(manager.close_all, "_beams", None) is not None:
        return False
    beams = manager.close_all

    @functools.wraps(beams)
    def close_all(self):
        cached = getattr(self, "_cached_handlers", None)
        if isinstance(cached, dict):
            processes = {h for handlers in cached.values() for h in handlers if isinstance(h, subprocess_handler)}
            if len(processes) > 1:
                threads = [threading.Thread(target=_close, args=(h,), name=f"close {getattr(h, 'worker_id', h)}",
                                            daemon=True) for h in processes]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                rest = collections.defaultdict(list)
                for key, handlers in cached.items():
                    rest[key] = [h for h in handlers if h not in processes]
                self._cached_handlers = rest
        beams(self)

    close_all._beams = beams
    manager.close_all = close_all
    return True
