"""DALI decoders that serve every caller of a shared model a batch at a time, each on a thread of its own.

Beam's RunInference shares one loaded model between a worker's bundle threads. A
:class:`images.dali_decoder.DaliDecoder` serves one stream at a time (its input queue and its
pipeline's outputs belong to one caller), and a decoded GPU batch lives in DALI's output buffer only
until the next one is taken. So callers used to borrow a decoder for the whole of a call, decode *and*
inference: with one decoder, the default, four bundle threads took turns at the GPU and no caller's
decoding overlapped another's engine call (benchmarks/NOTES.md: 0.38x the engine alone on an H100).

Here each decoder belongs to one thread, its :class:`DecoderService`. The service takes batches from
every caller in the order they arrive, keeps DALI's prefetch queue full across callers, and copies
each decoded batch out of DALI's output into a buffer that the caller owns (:class:`DeviceImages`:
device memory from the service's pool, given back by :meth:`DeviceImages.release`). The decoder then
goes on with the next batch while the caller's engine runs this one. Each result goes to the request
it was made for (a future per batch), and the decoder still checks, at every take, that the images
are those of the batch it fed (their ids), so a batch can never be scored as another.

Shared state: each service's request queue (``queue.Queue``: thread-safe) and buffer pool (locked);
the decoder and its DALI pipeline belong to the service's thread alone. Per caller: the futures of
its requests and the buffers their results hold, until it releases them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from engines.base import EngineError
from images.dali_decoder import DaliDecoder, DaliDecoderOptions, DecodedBatch, DecodeInput

_LOG = logging.getLogger(__name__)

_STOP = None  # the request that ends a service's thread


#: Most device buffers a decoder's pool makes: decoded batches waiting for their callers or in their engine
#: calls. Each is one batch (38.5 MB at 256 x 224 x 224 x 3); when all are out the decoder waits for one to
#: come back, so a decoder's buffers stay within the GPU memory check's margin (``engines.gpu_memory``).
MAX_BUFFERS = 6


class _BufferPool:
    """Device buffers of one size, reused (``cudaFree`` synchronizes the whole device), at most ``cap``.

    Shared state: the free list and the count, guarded by one condition (buffers are taken on the service's
    thread and given back on the callers').
    """

    def __init__(self, nbytes: int, cap: int = MAX_BUFFERS):
        self.nbytes = nbytes
        self.cap = cap
        self._changed = threading.Condition()
        self._free: List = []
        self._all: List = []
        self._closed = False

    @property
    def allocated(self) -> int:
        with self._changed:
            return len(self._all)

    def _new(self):
        from engines.cuda import DeviceBuffer

        return DeviceBuffer(self.nbytes)  # on the calling thread's current GPU

    def take(self):
        """A free buffer, a new one while under the cap, else the next one given back.

        Raises:
            EngineError: the pool is closed.
        """
        with self._changed:
            while True:
                if self._closed:
                    raise EngineError("the decoder is closed: the scorer was closed while scoring")
                if self._free:
                    return self._free.pop()
                if len(self._all) < self.cap:
                    break
                self._changed.wait()
            buffer = self._new()
            self._all.append(buffer)
            return buffer

    def give_back(self, buffer) -> None:
        with self._changed:
            if not self._closed:
                self._free.append(buffer)
                self._changed.notify()
                return
        buffer.free()  # the pool closed while the caller held it

    def close(self) -> None:
        """Frees the free buffers now; the ones callers hold are freed as they come back."""
        with self._changed:
            self._closed = True
            free, self._free = self._free, []
            self._changed.notify_all()
        for buffer in free:
            buffer.free()


class DeviceImages:
    """A decoded batch in device memory the caller owns, until :meth:`release` gives it back to the pool.

    Exposes ``__cuda_array_interface__`` (uint8, C-contiguous), which the engines bind in place.
    """

    def __init__(self, pool: _BufferPool, buffer, shape: Tuple[int, ...]):
        self._pool = pool
        self._buffer = buffer
        self.shape = shape

    @property
    def __cuda_array_interface__(self):
        if self._buffer is None:
            raise EngineError("a decoded batch was used after it was released (its buffer decodes another batch "
                              "now)")
        return {"shape": self.shape, "typestr": "|u1", "data": (self._buffer.ptr, False), "version": 3,
                "strides": None}

    def release(self) -> None:
        """Gives the buffer back for another batch; the images must not be read afterwards. Idempotent."""
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            self._pool.give_back(buffer)


def release(images) -> None:
    """Releases a decoded batch's buffer (:class:`DeviceImages`); host arrays need nothing."""
    if isinstance(images, DeviceImages):
        images.release()


class DecoderService:
    """One :class:`DaliDecoder` on a thread of its own, decoding the batches every caller submits.

    The decoder is built in the constructor (a broken setup fails when the model loads, not at the
    first batch); the thread starts then and stops at :meth:`close`.

    Args:
        options: What the decoder is built with (its ``device_id`` already the engine's GPU).
        name: The thread's name. Default "dali-decoder".

    Raises:
        ImportError, EngineError: as :class:`DaliDecoder`.
    """

    def __init__(self, options: DaliDecoderOptions, name: str = "dali-decoder"):
        self.options = options
        self._decoder = DaliDecoder(options)
        self._requests: "queue.Queue" = queue.Queue()
        self._closing = threading.Lock()  # guards _closed and _failure against a submit racing them
        self._closed = False
        self._failure: Optional[BaseException] = None  # why the thread stopped, if it did on its own
        crop_h, crop_w = options.crop_size
        self._pool = _BufferPool(options.max_batch * crop_h * crop_w * 3) if options.device == "gpu" else None
        self._stream = None  # the copy stream, made on the service's thread (on the decoder's GPU)
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Batches submitted and not yet taken up by the decoder (approximate: for choosing a service)."""
        return self._requests.qsize()

    @property
    def buffers(self) -> int:
        """Device buffers made so far (the most batches held at once by callers or in copy)."""
        return self._pool.allocated if self._pool is not None else 0

    def submit(self, batch: DecodeInput) -> "concurrent.futures.Future":
        """Queues one batch; the future's result is its :class:`DecodedBatch`, whose ``images`` the caller
        owns (:func:`release` them after use).

        Raises:
            EngineError: a batch of no or too many images, or without crop boxes (checked here, so that a
                bad request never reaches the stream other callers' batches share); the service is closed.
        """
        batch = self._decoder.checked(batch)  # on the caller's thread (reads only the decoder's options)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._closing:
            if self._failure is not None:
                raise EngineError(f"the DALI decoder thread stopped: {self._failure!r}") from self._failure
            if self._closed:
                raise EngineError("the decoder is closed: the scorer was closed while scoring")
            self._requests.put((batch, future))
        return future

    @property
    def alive(self) -> bool:
        """Whether the service takes batches (not closed, its thread not stopped by an error)."""
        with self._closing:
            return not self._closed and self._failure is None

    def decode(self, batches: Sequence[DecodeInput], ahead: Optional[int] = None) -> Iterator[DecodedBatch]:
        """Decodes ``batches`` in order, up to ``ahead`` of the one being used submitted to the service.

        Args:
            batches: Each a :class:`DecodeInput`.
            ahead: Batches submitted before the one taken is used. Default: all of them at once, so the
                decoder's prefetch queue holds this call's next batches while its engine runs the first
                (submitted one at a time, the decoder's queue was often empty when it looked for the next
                batch, and it decoded each only once asked for).

        Yields:
            One :class:`DecodedBatch` per batch, ``seconds`` the time this caller waited for it. Its
            ``images`` belong to the caller: :func:`release` them once the engine has read them. A stream
            closed early releases the batches it did not hand out, as they arrive.

        Raises:
            EngineError: as :meth:`submit`, or what decoding the batch raised (the GPU ran out of memory).
        """
        batches = list(batches)
        ahead = max(1, ahead or len(batches))
        pending: "collections.deque" = collections.deque()
        source = iter(batches)

        def fill() -> None:
            while len(pending) < ahead:
                batch = next(source, None)
                if batch is None:
                    return
                pending.append(self.submit(batch))

        try:
            fill()
            while pending:
                future = pending.popleft()
                start = time.perf_counter()
                decoded = future.result()
                try:
                    fill()  # the next batch is queued before this one is used
                except BaseException:
                    release(decoded.images)  # never handed out: nobody else would release it
                    raise
                yield decoded._replace(seconds=time.perf_counter() - start)
        finally:
            for future in pending:  # a stream closed early: its queued batches are released when done
                future.add_done_callback(release_result)

    def close(self) -> None:
        """Stops the thread once the batches already submitted are answered; closes the decoder and frees
        the buffers (those callers still hold are freed as they are released)."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._requests.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)
        if self._thread.is_alive():
            _LOG.warning("the DALI decoder thread did not stop within 60 s; its decoder is left to it")
            return
        self._decoder.close()
        if self._pool is not None:
            self._pool.close()
        if self._stream is not None:
            self._stream.destroy()
            self._stream = None

    # The service's thread.

    def _serve(self) -> None:
        try:
            if self.options.device == "gpu":
                from engines.cuda import Stream, set_device

                set_device(self.options.device_id)  # buffers and copies on the decoder's GPU
                self._stream = Stream()
            while True:
                first = self._requests.get()
                if first is _STOP:
                    break
                self._run_stream(first)
        except BaseException as e:  # the thread cannot go on: every request waiting, and later ones, get why
            _LOG.error("the DALI decoder thread stopped: %r", e)
            with self._closing:
                self._failure = e
            self._fail_waiting(e)

    def _fail_waiting(self, error: BaseException) -> None:
        while True:
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[1].set_exception(error)

    def _run_stream(self, first) -> None:
        """Decodes the requests waiting now, in order, as one decoder stream (prefetching across callers);
        the stream ends when the queue is empty after a take, and the next request starts another.

        Every request taken off the queue is answered: with its batch, or with the error that ended the
        stream (raised again when it is not an ``Exception``, which stops the thread)."""
        # The requests taken off the queue for this stream, in order; each answered one is let go (None), for a
        # stream can last as long as callers keep the queue full (scoring ahead), and its callers drop theirs.
        fed: List = [first]
        del first
        answered = 0

        def source():
            yield fed[0][0]
            while True:
                try:
                    item = self._requests.get_nowait()
                except queue.Empty:
                    return
                if item is _STOP:
                    self._requests.put(_STOP)  # the outer loop stops after this stream
                    return
                fed.append(item)
                yield item[0]

        try:
            for decoded in self._decoder.decode(source()):
                future = fed[answered][1]
                fed[answered] = None
                answered += 1
                try:
                    owned = self._owned(decoded)
                except Exception as e:  # a failed copy fails this batch alone
                    error = e if isinstance(e, EngineError) else EngineError(
                        f"copying a decoded batch out of DALI failed: {e}")
                    error.__cause__ = None if error is e else e
                    future.set_exception(error)
                    continue
                finally:
                    del decoded
                future.set_result(owned)
                del future, owned
        except BaseException as e:  # the decoder raised (out of memory, a rebuild that failed, a batch not
            if fed[answered:]:      # its own): every request of this stream not yet answered gets the error
                _LOG.warning("the DALI decoder failed %d batch(es): %s", len(fed) - answered, e)
            for _, future in fed[answered:]:
                future.set_exception(e)
            if not isinstance(e, Exception):
                raise

    def _owned(self, decoded: DecodedBatch) -> DecodedBatch:
        """The batch with its images in memory the caller owns: GPU images copied out of DALI's output
        buffer (which the decoder reuses once the next batch is taken); host arrays are the caller's."""
        images = decoded.images
        if isinstance(images, np.ndarray) or not hasattr(images, "data_ptr"):
            return decoded
        from engines.cuda import copy_d2d_async

        shape = tuple(int(d) for d in images.shape())
        nbytes = int(np.prod(shape))
        if not nbytes:
            return decoded._replace(images=np.zeros(shape, np.uint8))
        if nbytes > self._pool.nbytes:
            raise EngineError(f"a decoded batch of shape {shape} is larger than the decoder's buffers "
                              f"({self._pool.nbytes} bytes)")
        buffer = self._pool.take()
        try:
            # DALI's share_outputs returned once the batch was ready: a copy on any stream reads it whole.
            copy_d2d_async(buffer.ptr, int(images.data_ptr()), nbytes, self._stream)
            self._stream.synchronize()
        except BaseException:
            self._pool.give_back(buffer)
            raise
        return decoded._replace(images=DeviceImages(self._pool, buffer, shape))


def release_result(future: "concurrent.futures.Future") -> None:
    """Releases the images of a submitted batch's result once it is done (a done callback for a result
    nobody will take)."""
    if not future.cancelled() and future.exception() is None:
        release(future.result().images)


class Decoders:
    """The decoders of one loaded model: ``count`` services, each a DALI pipeline on a thread of its own.

    A call's batches all go to the service with the fewest batches waiting. All are built at once
    (each about 0.9 GB of GPU memory at batch 256 and ``threads`` CPU threads).

    Args:
        options: What every decoder is built with.
        count: How many. Default 1: measured with four bundle threads on an H100 (benchmarks/NOTES.md).

    Raises:
        EngineError: ``count`` below 1; a decoder cannot be built (the ones built are closed).
    """

    def __init__(self, options: DaliDecoderOptions, count: int = 1):
        if count < 1:
            raise EngineError(f"--max_decoders must be >= 1 (each a DALI pipeline on a thread of its own), got "
                              f"{count}")
        self.options = options
        self.services: List[DecoderService] = []
        try:
            for i in range(count):
                self.services.append(DecoderService(options, name=f"dali-decoder-{i}"))
        except BaseException:
            self.close()
            raise

    def _least_busy(self) -> DecoderService:
        """The working service with the fewest batches waiting (a stopped one's queue is empty: it would draw
        every call and fail each); with none working, the first, which says why."""
        working = [s for s in self.services if s.alive] or self.services
        return min(working, key=lambda s: s.waiting)

    def decode(self, batches: Sequence[DecodeInput], ahead: Optional[int] = None) -> Iterator[DecodedBatch]:
        """As :meth:`DecoderService.decode`, on the least busy working service."""
        return self._least_busy().decode(batches, ahead)

    def submit(self, batch: DecodeInput) -> "concurrent.futures.Future":
        """As :meth:`DecoderService.submit`, on the least busy working service."""
        return self._least_busy().submit(batch)

    def close(self) -> None:
        for service in self.services:
            service.close()
