"""Many local files read in one call on DALI's own threads: ``[path] -> [bytes]``.

Why: the GPU path's readers are Python threads, and every system call they make for a file (open, read, close)
lets go of the GIL and must win it back from the bundle thread, which CPython grants only at its switch interval
when that thread is running Python. On a 16-core H100 host the pipeline with a no-op engine was held to half the
engine's rate by these calls (benchmarks/NOTES.md, "Where the no-op floor's time goes"; ``benchmarks.dali_file_read``
measures the convoy). DALI's ``fn.io.file.read`` (DALI >= 2.4) opens and reads each path on DALI's worker threads,
which never take the GIL, so a batch of files costs the caller one GIL hand-off instead of three or four per file.

The caller keeps every reading rule: it ``stat``s each file first (:func:`images.reading.regular_file_size`), so a
FIFO, a device or a directory never reaches DALI and an oversized file is refused unread, and it screens the bytes
that come back exactly as it screens bytes it read itself. DALI's reader asserts that it read the whole file, so any
failure (a file gone or shrunk since the ``stat``, no permission) fails the whole call; the caller then reads that
call's files one at a time, which gives each its own reason (:func:`images.reading.load_local_batch`).

Imported lazily (DALI is needed only where ``--decode gpu`` or ``dali_cpu`` already needs it).
"""

from __future__ import annotations

import os
import threading
from typing import List, Optional, Sequence

import numpy as np

#: DALI worker threads per reading pipeline. Each only waits on the disk; the GPU path has two reader threads
#: (``transforms.images.LOCAL_GPU_READERS``), so 8 threads in all on hosts of 16 cores.
DALI_READ_THREADS = 4

#: Most files one pipeline is built for; a longer list is read in parts of this many.
MAX_FILES_PER_READ = 256


class DaliFileReader:
    """Reads lists of local files with DALI's ``fn.io.file.read`` (CPU only, no GPU needed).

    Shared state: one DALI pipeline per calling thread (``threading.local``), since a DALI pipeline serves one
    caller at a time; the pipeline is built on a thread's first call and rebuilt after any failed call (DALI leaves
    a pipeline unusable once a run has failed). Files are read with plain I/O, not ``mmap``: a mapped file that
    another process truncates kills the reading process with SIGBUS.

    Args:
        threads: DALI worker threads per pipeline. Default :data:`DALI_READ_THREADS`.
        max_files: Files per pipeline run. Default :data:`MAX_FILES_PER_READ`.
    """

    def __init__(self, threads: int = DALI_READ_THREADS, max_files: int = MAX_FILES_PER_READ):
        if threads < 1 or max_files < 1:
            raise ValueError(f"need threads >= 1 and max_files >= 1, got {threads}, {max_files}")
        self._threads = threads
        self.max_files = max_files
        self._local = threading.local()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self.max_files, num_threads=self._threads, device_id=None,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def read_files():
            return fn.io.file.read(fn.external_source(name="paths", dtype=types.UINT8), dont_use_mmap=True)

        pipe = read_files()
        pipe.build()
        return pipe

    def _pipeline(self):
        pipe: Optional[object] = getattr(self._local, "pipe", None)
        if pipe is None:
            pipe = self._local.pipe = self._build()
        return pipe

    def read(self, paths: Sequence[str]) -> List[bytes]:
        """The whole contents of each path, in order.

        Args:
            paths: Local paths of regular files (the caller has checked each with ``stat``).

        Raises:
            ImportError: DALI is not installed.
            ValueError: a path holds a NUL byte (DALI would read the file the path names up to it).
            RuntimeError: any file could not be read whole (DALI's message names it); the call read nothing.
        """
        encoded = [os.fsencode(path) for path in paths]
        bad = next((path for path, raw in zip(paths, encoded) if b"\0" in raw), None)
        if bad is not None:
            raise ValueError(f"a path holds a NUL byte: {bad!r}")
        out: List[bytes] = []
        for start in range(0, len(paths), self.max_files):
            part = encoded[start:start + self.max_files]
            pipe = self._pipeline()
            try:
                pipe.feed_input("paths", [np.frombuffer(raw, np.uint8) for raw in part])
                files, = pipe.run()
            except BaseException:
                self._local.pipe = None  # DALI: "Current pipeline object is no longer valid"
                raise
            out.extend(np.asarray(files[i]).tobytes() for i in range(len(part)))
        return out
