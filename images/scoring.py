"""Score batches of images with an engine and, optionally, a GPU decoder that feeds it directly.

:class:`ImageScorer` is what the image pipeline's model handler loads: one engine and (for
``--decode gpu`` or ``dali_cpu``) DALI decoders on the same GPU, each on a thread of its own serving
every caller's batches (``images.decoder_service.Decoders``). A batch arrives as CPU-decoded pixels
and/or encoded files; a call submits all its encoded batches at once, so the GPU decodes the next
batch (this caller's or another's) while the engine runs the current one, and the
engine reads the decoded batch where it is (``__cuda_array_interface__``, a buffer the call owns until
its engine call returns): no host round trip of pixels. Only the requested outputs (the logits) are
copied back. No Beam here.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from engines.base import Engine, EngineError, array_info
from images.decoder_service import release, release_result
from images.pillow_decoder import PreprocessConfig, crop_box

#: One batch to score: (pixels decoded on the CPU or None, encoded files for the decoder, and each
#: file's crop region ``(left, top, right, bottom)`` for the decoder, or None).
Item = Tuple[Optional[np.ndarray], Sequence[bytes], Optional[Sequence[Sequence[float]]]]


class Scored(NamedTuple):
    """The result for one :data:`Item`.

    Attributes:
        outputs: Output name -> host array with one row per image that was scored: the pixel
            rows first, then the encoded images that decoded, each group in input order.
        failed: Position within the item (pixel rows count first) -> reason, for images the
            decoder could not decode.
        decode_s: Time spent waiting for decoded batches.
        infer_s: Time spent in the engine.
        engine_calls: Batch sizes of the engine calls made.
        device: The GPU the engine (and its decoder) ran on, or None on the CPU.
    """

    outputs: Dict[str, np.ndarray]
    failed: Dict[int, str]
    decode_s: float
    infer_s: float
    engine_calls: List[int]
    device: Optional[int] = None


class ImageScorer:
    """An engine plus an optional pool of decoders, scoring whole batches.

    Several threads may call :meth:`score` at once, as Beam's RunInference does with the model it
    shares between a worker's bundle threads. Per caller: its decoded batches (a buffer each, released
    once the engine has read it) and everything a call builds. Shared: the engine, which serves
    concurrent calls itself (``engines.base.Engine``: ONNX Runtime's session pool, TensorRT's slot
    pool), and the decoders, whose request queues are thread-safe and whose DALI pipelines only their
    own threads touch. Nothing else changes after construction.

    Args:
        engine: The loaded engine (one image input).
        decoders: :class:`images.decoder_service.Decoders`, or None when every image arrives
            decoded. Default None.
        fallback_decode: Decodes one encoded file on the CPU (bytes -> uint8 (height, width, 3)),
            used when encoded images arrive and there is no decoder (an ``auto`` choice that
            differed between the reading and the scoring worker). Default None: an error.

    Batches larger than the engine's ``batch_limit()`` are cut into engine-sized calls (host arrays
    only; a device batch over the limit is an error naming ``--batch_size``).
    """

    def __init__(self, engine: Engine, decoders=None,
                 fallback_decode: Optional[Callable[[bytes], np.ndarray]] = None):
        names = engine.input_names()
        if len(names) != 1:
            raise EngineError(f"the image pipeline feeds one input; the model has {len(names)}: {names}")
        self.engine = engine
        self.decoders = decoders
        self._input = names[0]
        self._fallback = fallback_decode
        self._ahead_lock = threading.Lock()  # guards _ahead and _closed; orders decode and engine queues alike
        self._ahead: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._closed = False

    def _infer(self, images, outputs: Optional[Sequence[str]], calls: List[int]) -> List[Dict[str, np.ndarray]]:
        rows = array_info(images).shape[0]
        limit = self.engine.batch_limit()
        if not limit or rows <= limit:
            calls.append(rows)
            return [self._checked(self.engine.infer({self._input: images}, outputs), rows)]
        if not isinstance(images, np.ndarray):
            raise EngineError(f"a device batch of {rows} is larger than the engine's max batch {limit}; lower "
                              f"--batch_size to {limit}")
        results = []
        for start in range(0, rows, limit):
            calls.append(min(limit, rows - start))
            results.append(self._checked(self.engine.infer({self._input: images[start:start + limit]}, outputs),
                                         calls[-1]))
        return results

    def _checked(self, result: Dict[str, np.ndarray], rows: int) -> Dict[str, np.ndarray]:
        """The engine's outputs, each with one row per image fed: rows are paired with images by position."""
        for name, value in result.items():
            if np.ndim(value) and value.shape[0] != rows:
                raise EngineError(f"Output tensor: {name} | batch dimension {value.shape[0]} does not match the "
                                  f"{rows} images fed to the {self.engine.kind} engine")
        return result

    def score(self, items: Sequence[Item], outputs: Optional[Sequence[str]] = None) -> List[Scored]:
        """Scores each item; encoded images are decoded ahead while the engine runs.

        Safe to call from several threads at once: each call's batches go to a decoder's queue and
        come back to this call alone, in a buffer it releases after its engine call.

        Args:
            items: Batches to score.
            outputs: Output names to return. Default None: all.

        Returns:
            One :class:`Scored` per item, in order.

        Raises:
            EngineError: encoded images and neither a decoder nor a fallback; or rows that cannot
                be paired with their images (a decoded batch or an engine output with another row
                count than its images, a decoded batch that is not the one fed).
        """
        encoded = [self._decode_input(files, boxes) for _, files, boxes in items if files]
        decoded = self.decoders.decode(encoded) if encoded and self.decoders is not None else None
        return self._score(items, outputs, decoded)

    def _decode_input(self, files: Sequence[bytes], boxes):
        """One item's encoded files as the decoder takes them.

        Raises:
            EngineError: there is neither a decoder nor a CPU fallback for them.
        """
        from images.dali_decoder import DecodeInput

        if self.decoders is None and self._fallback is None:
            raise EngineError("encoded images reached an engine without a decoder; run with --decode gpu on a "
                              "GPU worker, or --decode cpu")
        return DecodeInput([np.frombuffer(data, np.uint8) for data in files], boxes or None)

    def score_ahead(self, item: Item, outputs: Optional[Sequence[str]] = None) -> "concurrent.futures.Future":
        """Starts scoring one batch now and returns at once: the future's result is its :class:`Scored`, as
        ``score([item], outputs)[0]`` would give, or the error scoring raised.

        The batch's encoded files go to a decoder's queue here, on the caller's thread (a reader's), and the
        engine call runs on one of this scorer's ``score-ahead`` threads (as many as the engine runs calls at
        once), batches taken in the order they were started (the decoder's queue has them in the same order,
        so a thread waits only for a decode no later one is ahead of).
        Safe to call from several threads, and beside :meth:`score` (``transforms.ahead``).

        Raises:
            EngineError: encoded images and neither a decoder nor a fallback; a batch the decoder refuses; the
                scorer is closed.
        """
        _, files, boxes = item
        request = self._decode_input(files, boxes) if files else None
        with self._ahead_lock:
            if self._closed:
                raise EngineError("the scorer is closed")
            if self._ahead is None:
                # As many engine calls at once as the engine runs (sessions, execution contexts), as concurrent
                # callers of score() would make; each thread takes the next batch in order.
                self._ahead = concurrent.futures.ThreadPoolExecutor(max(1, self.engine.concurrent_calls()),
                                                                    thread_name_prefix="score-ahead")
            pending = self.decoders.submit(request) if request is not None and self.decoders is not None else None
            try:
                future = self._ahead.submit(self._score_started, item, outputs, pending)
            except BaseException:
                if pending is not None:
                    pending.add_done_callback(release_result)  # nobody will take it
                raise
        if pending is not None:
            # A call the pool dropped unstarted (closed) never takes its decoded batch: release it when it comes.
            future.add_done_callback(lambda f: f.cancelled() and pending.add_done_callback(release_result))
        return future

    def _score_started(self, item: Item, outputs: Optional[Sequence[str]], pending) -> Scored:
        """:meth:`score_ahead`'s work, on the ``score-ahead`` thread: ``pending`` is the item's decode."""
        taken = []

        def decoded():
            start = time.perf_counter()
            batch = pending.result()
            taken.append(batch)
            yield batch._replace(seconds=time.perf_counter() - start)

        try:
            return self._score([item], outputs, decoded() if pending is not None else None)[0]
        finally:
            if pending is not None and not taken:  # the engine failed on the item's CPU rows before its decode
                pending.add_done_callback(release_result)

    def _score(self, items: Sequence[Item], outputs: Optional[Sequence[str]], decoded) -> List[Scored]:
        results = []
        device = self.engine.device_index()
        try:
            for pixels, files, _ in items:
                parts: List[Dict[str, np.ndarray]] = []
                failed: Dict[int, str] = {}
                calls: List[int] = []
                decode_s = infer_s = 0.0
                first = 0 if pixels is None else len(pixels)
                if first:
                    start = time.perf_counter()
                    parts += self._infer(pixels, outputs, calls)
                    infer_s += time.perf_counter() - start
                if files:
                    start = time.perf_counter()
                    if decoded is not None:
                        batch = next(decoded)  # this call's own buffer until released below
                        images, failed_here, count = batch.images, batch.failed, len(batch.index)
                    else:
                        images, failed_here = self._decode_on_cpu(files)
                        count = len(images)
                    try:
                        if decoded is not None:
                            _check_decoded(batch, len(files))
                        failed.update({first + i: reason for i, reason in failed_here.items()})
                        decode_s += time.perf_counter() - start
                        if count:
                            start = time.perf_counter()
                            parts += self._infer(images, outputs, calls)
                            infer_s += time.perf_counter() - start
                    finally:
                        release(images)  # the engine has read it: the buffer decodes another batch
                merged = {name: np.concatenate([p[name] for p in parts]) if len(parts) > 1 else parts[0][name]
                          for name in (parts[0] if parts else {})}
                results.append(Scored(merged, failed, decode_s, infer_s, calls, device))
        finally:
            if decoded is not None:
                decoded.close()  # batches this call queued and did not take are released as they arrive
        return results

    def warm_up(self, images: int, preprocess: Optional[PreprocessConfig] = None) -> None:
        """Scores one batch of ``images`` synthetic photos, through the decoder when there is one, so that
        engine and decoder allocate their working memory now (``engines.gpu_memory`` measures it) and the
        first real batch does not wait for the engine's first-run set-up (ONNX Runtime's convolution search).

        Args:
            images: The batch: the job's engine batch (at most the decoder's ``max_batch``).
            preprocess: The job's preprocessing (the crop box of each photo). Default: ``PreprocessConfig()``.

        Raises:
            EngineError: the decoder failed on the warm-up photos, or the engine returned no rows for them.
        """
        config = preprocess or PreprocessConfig()
        if self.decoders is not None:
            images = min(images, self.decoders.options.max_batch)
            data, box = _warm_up_photo(config)
            item = (None, [data] * images, [box] * images)
        else:
            item = (np.zeros((images, *config.crop_size, 3), np.uint8), (), None)
        result = self.score([item])[0]
        if result.failed or any(np.ndim(v) and v.shape[0] != images for v in result.outputs.values()):
            raise EngineError(f"the warm-up batch of {images} synthetic photos did not score: "
                              f"{sorted(set(result.failed.values()))[:1] or 'no rows'}")

    def _decode_on_cpu(self, files: Sequence[bytes]):
        images, failed = [], {}
        for i, data in enumerate(files):
            try:
                images.append(self._fallback(bytes(data)))
            except Exception as e:  # the fallback raises BadImageError with the reason
                failed[i] = str(e)
        if not images:  # no rows, so nothing reaches the engine: the crop's size is not needed
            return np.zeros((0, 0, 0, 3), np.uint8), failed
        return np.stack(images), failed

    def describe(self) -> Dict[str, object]:
        info = dict(self.engine.describe())
        if self.decoders is not None:
            o = self.decoders.options
            info["decoder"] = {"library": "nvidia-dali", "device": o.device, "max_batch": o.max_batch,
                               "hw_decoder_load": o.hw_decoder_load, "prefetch": o.prefetch,
                               "decoders": len(self.decoders.services)}
        return info

    def close(self) -> None:
        """Closes every decoder of the pool and the engine; call when no thread is scoring. Batches started
        ahead and not yet begun are dropped (their futures cancelled); one being scored finishes first."""
        with self._ahead_lock:
            self._closed = True
            ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.shutdown(wait=True, cancel_futures=True)
        if self.decoders is not None:
            self.decoders.close()
        self.engine.close()


#: The warm-up photo's (width, height).
WARM_UP_SIZE = (1600, 1200)


@functools.lru_cache(maxsize=4)
def _warm_up_photo(config: PreprocessConfig) -> Tuple[bytes, Tuple[float, float, float, float]]:
    """A 1600 x 1200 JPEG (2 Mpx, a common web photo) with detail in it (a gradient and noise: Huffman
    decoding has work to do), and its crop box. The decoder's buffers grow with the largest photo it has
    decoded, so the GPU memory a warm-up measures is what batches of photos up to this size take."""
    import io

    from PIL import Image

    width, height = WARM_UP_SIZE
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)],
                      axis=-1)
    pixels = np.clip(pixels + rng.integers(-40, 41, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue(), tuple(crop_box(width, height, config))


def _check_decoded(batch, files: int) -> None:
    """A decoded batch accounts for each of its ``files`` images once: decoded (one row each) or failed."""
    rows = array_info(batch.images).shape[0]
    if rows != len(batch.index) or sorted([*batch.index, *batch.failed]) != list(range(files)):
        raise EngineError(f"the decoder returned {rows} rows for images {batch.index} and failures for "
                          f"{sorted(batch.failed)}, for a batch of {files} images; none of it was scored")
