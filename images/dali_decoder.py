"""Batch image decoding with NVIDIA DALI: encoded JPEG/PNG bytes -> uint8 (N, height, width, 3).

On a GPU (``device="gpu"``) DALI's mixed backend decodes with the hardware JPEG decoder where
the GPU has one (A100, H100, L4; ``hw_decoder_load`` sets its share) and nvJPEG on the SMs
otherwise (T4, V100), resizes and crops on the GPU, and the batch stays there: the engine
reads it through ``__cuda_array_interface__`` with no host round trip. ``device="cpu"`` runs
the same graph on the CPU (``device_id=None``), for CI and for debugging decode differences on
a laptop.

The graph reproduces ``images.pillow_decoder`` exactly as defined there: the shorter side
scaled to ``resize``, the centre ``crop_size`` (height x width) of that, taken as one antialiased linear
resize of the matching source region, EXIF orientation applied. By default the caller passes each
image's region (``crop_box`` of the header size the pre-screen read, the CPU path's own function);
``crop_box="graph"`` computes it inside the graph from ``peek_image_shape`` instead (no caller
input, ~15 per-sample CPU operators: 12.8k vs 15.3k images/s on an H100 host, benchmarks/NOTES.md).

Decoding runs ahead: up to ``prefetch`` batches are decoded while the caller uses the current
one (DALI's scheduled API). A batch DALI fails on breaks the pipeline object; the decoder
then rebuilds it and decodes that batch image by image, so only the bad images fail.

A decoder serves one stream at a time; callers that share a model (Beam's bundle threads) hand their
batches to a :class:`images.decoder_service.DecoderService`, whose thread alone uses the decoder. Identity travels with the
pixels: each batch fed gets a number of its own, and every image an id (that number, its
position) that the graph returns beside the decoded image. When a batch is taken the ids must be
those of the batch the caller queued, one per image, or the take raises an :class:`EngineError`
naming both: a batch can never be scored as another.

DALI is imported lazily; install ``nvidia-dali-cuda130`` (or ``-cuda120``) for the CUDA major
of the environment (the ``gpu`` extra, or the image built from the Dockerfile).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import logging
import os
import time
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from engines.base import EngineError, array_info, import_optional
from images.pillow_decoder import crop_problem
from engines.devices import cuda_device_count

_LOG = logging.getLogger(__name__)

DALI_HINT = ("Install NVIDIA DALI for the environment's CUDA major: pip install nvidia-dali-cuda130 (CUDA 13) or "
             "nvidia-dali-cuda120 (CUDA 12), e.g. pip install -e '.[gpu]'; or pass --decode cpu.")
DEVICES = ("gpu", "cpu")


@dataclasses.dataclass(frozen=True)
class DaliDecoderOptions:
    """What the DALI graph does and where.

    Attributes:
        resize: Shorter side before the centre crop; at least the crop's height and width. Default 256.
        crop: Height of the centre crop (the model input's rows), and its width too unless
            ``crop_width`` is given. Default 224.
        max_batch: Most images per batch. Default 256.
        device: ``"gpu"`` (mixed backend, output on the GPU) or ``"cpu"``. Default "gpu".
        device_id: CUDA device for ``"gpu"``. Default 0.
        threads: DALI CPU threads (Huffman decoding, non-JPEG formats); 0: the cores of the machine the decoder
            is built on, at most 16 (:attr:`threads_here`), for options made on another machine. Default 4.
        hw_decoder_load: Share of JPEG work given to the hardware decoder where the GPU has one
            (0..1). Default 0.65 (DALI's); measured on an H100: 0.65 -> 20.2k images/s,
            1.0 -> 21.7k, CUDA only -> 7.2k.
        prefetch: Batches decoded ahead of the one in use (DALI's prefetch queue). Default 2.
        crop_box: Where each image's crop region comes from: ``"host"`` (the caller passes it
            with the batch, computed from the header the pre-screen read) or ``"graph"``
            (computed inside the graph from ``peek_image_shape``: no caller input, but ~15
            per-sample CPU operators). Default "host".
        crop_width: Width of the centre crop (the model input's columns). Default None: ``crop``,
            a square. As ``images.pillow_decoder.PreprocessConfig``, whose crop boxes the
            ``"host"`` mode is given.
    """

    resize: int = 256
    crop: int = 224
    max_batch: int = 256
    device: str = "gpu"
    device_id: int = 0
    threads: int = 4
    hw_decoder_load: float = 0.65
    prefetch: int = 2
    crop_box: str = "host"
    crop_width: Optional[int] = None

    def __post_init__(self):
        problem = crop_problem(self.resize, self.crop, self.crop_width)
        if problem:
            raise EngineError(problem)
        if self.device not in DEVICES:
            raise EngineError(f"DALI device must be one of {DEVICES}, got {self.device!r}")
        if self.max_batch < 1 or self.threads < 0 or self.prefetch < 1:
            raise EngineError(f"max_batch and prefetch must be >= 1 and threads >= 0, got {self.max_batch}, "
                              f"{self.prefetch} and {self.threads}")
        if self.crop_box not in ("host", "graph"):
            raise EngineError(f"crop_box must be 'host' or 'graph', got {self.crop_box!r}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise EngineError(f"hw_decoder_load must be within 0..1, got {self.hw_decoder_load}")

    @property
    def threads_here(self) -> int:
        """The threads a decoder built on this machine runs: ``threads``, or for 0 this machine's cores, at most 16."""
        return self.threads or min(16, os.cpu_count() or 1)

    @property
    def crop_size(self) -> Tuple[int, int]:
        """The centre crop as (height, width): each decoded image's shape but its 3 channels."""
        return self.crop, self.crop if self.crop_width is None else self.crop_width


class DecodeInput(NamedTuple):
    """One batch to decode.

    Attributes:
        encoded: 1-D uint8 arrays, the encoded files.
        boxes: Per image, the source region ``(left, top, right, bottom)`` that resize-and-crop
            keeps, in EXIF-oriented pixel coordinates (``images.pillow_decoder.crop_box``); needed
            with ``crop_box="host"``, ignored with ``"graph"``.
    """

    encoded: Sequence[np.ndarray]
    boxes: Optional[Sequence[Sequence[float]]] = None


class DecodedBatch(NamedTuple):
    """One decoded batch.

    Attributes:
        images: (n, height, width, 3) uint8 (``crop_size``) for the images that decoded, in input order: a DALI
            GPU tensor (``__cuda_array_interface__``) valid until the next batch is taken, or a
            numpy array.
        index: Input positions of those images (``images[j]`` is input ``index[j]``), read from
            the ids the graph returned with them.
        failed: Input position -> reason, for images DALI could not decode.
        seconds: Wall time the caller waited for this batch.
    """

    images: object
    index: List[int]
    failed: Dict[int, str]
    seconds: float


def _tiny_jpeg() -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, "JPEG")
    return np.frombuffer(buf.getvalue(), np.uint8)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "pipeline object is no longer valid" not in line
              and not line.startswith(("File ", "Error in", "which was used", "encountered", "Critical error"))]
    text = (useful or lines or [type(error).__name__])[-1]
    return text[:300]


#: Words in a DALI/nvJPEG/CUDA error that mean the GPU ran out of memory, not that an image is bad.
_OUT_OF_MEMORY = ("out of memory", "allocator failure", "allocation failed", "failed to allocate",
                  "cudaerrormemoryallocation", "cuda_error_out_of_memory", "bad_alloc", "can't allocate",
                  "cannot allocate")


def out_of_memory_error(error: BaseException) -> Optional[EngineError]:
    """An EngineError naming the fix when ``error`` is a GPU memory failure, else None.

    Retrying image by image (what a failed batch gets) cannot help then: every retry needs memory
    too, and each rebuilds the pipeline. Measured on a two-H100 machine: eight SDK processes on one
    80 GB GPU filled it, and one process rebuilt its decoder 1,400 times in two minutes.
    """
    text = str(error).lower()
    if not any(words in text for words in _OUT_OF_MEMORY):
        return None
    return EngineError(f"the GPU ran out of memory while decoding ({_first_line(error)}); run fewer SDK processes "
                       f"per GPU (each holds an engine and a decoder: locally fewer --direct_num_workers; on "
                       f"Dataflow one process per worker with --experiments=no_use_multiple_sdk_containers and "
                       f"--model_copies N for N GPUs) or a smaller --batch_size")


def _plural(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"


class DaliDecoder:
    """A built DALI pipeline that decodes batches of encoded images, prefetching ahead.

    Not thread-safe: its input queue and its DALI pipeline belong to one caller at a time, for the
    whole of a :meth:`decode` stream. Callers that share a model submit their batches to a
    :class:`images.decoder_service.DecoderService`, the one thread that uses its decoder. Two streams mixed on one decoder raise :class:`EngineError` at
    the first batch one of them takes from the other (the ids checked at each take), never hand one
    caller another's images.

    Args:
        options: See :class:`DaliDecoderOptions`.

    Raises:
        ImportError: DALI is not installed (the message names the wheel).
        EngineError: the pipeline cannot be built on this device.
    """

    def __init__(self, options: DaliDecoderOptions = DaliDecoderOptions()):
        self.options = options
        self._dali = import_optional("nvidia.dali", DALI_HINT)
        self._pipe = None
        self._inputs: collections.deque = collections.deque()
        # With no_copy DALI reads fed arrays in place: keep every input of the runs that may still
        # be in flight (at most `prefetch`) referenced here.
        self._alive: collections.deque = collections.deque(maxlen=options.prefetch + 2)
        self.rebuilds = 0
        # Numbers each fed batch; never restarts (not at a rebuild either), so an output left over
        # from an earlier batch cannot pass for a later one.
        self._batch_numbers = itertools.count()
        self._build()

    def _next_input(self):
        item = self._inputs.popleft()
        self._alive.append(item)
        return item

    def _graph(self):
        from nvidia.dali import fn, pipeline_def, types
        import nvidia.dali.math as dmath

        o = self.options
        gpu = o.device == "gpu"
        crop_h, crop_w = o.crop_size

        @pipeline_def(batch_size=o.max_batch, num_threads=o.threads_here, device_id=o.device_id if gpu else None,
                      prefetch_queue_depth=o.prefetch, exec_async=True, exec_pipelined=True)
        def graph():
            # Inputs come from self._inputs, which _schedule fills right before each schedule_run:
            # DALI calls a non-parallel source in the calling thread, once per run.
            # Each sample's id (batch number, position) rides through the graph beside its image and
            # comes back with it: the take checks it (see the module docstring).
            if o.crop_box == "host":
                # no_copy: DALI reads the caller's arrays in place (decode() keeps each batch alive until
                # its output is taken); copying 256 x 43 KB under the GIL cost ~15 ms a batch on the
                # H100 host, 14% of the main thread (py-spy, benchmarks/NOTES.md).
                encoded, start, end, ids = fn.external_source(
                    source=self._next_input, num_outputs=4, batch=True, no_copy=True,
                    dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT64])
            else:
                encoded, ids = fn.external_source(source=self._next_input, num_outputs=2, batch=True, no_copy=True,
                                                  dtype=[types.UINT8, types.INT64])
                # The region images.pillow_decoder.crop_box keeps, from the (EXIF-oriented) header size.
                shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)
                height, width = shape[0], shape[1]
                scale = o.resize / dmath.min(height, width)
                resized_w, resized_h = dmath.floor(width * scale + 0.5), dmath.floor(height * scale + 0.5)
                left, top = dmath.floor((resized_w - crop_w) / 2), dmath.floor((resized_h - crop_h) / 2)
                sx, sy = width / resized_w, height / resized_h
                start = fn.stack(top * sy, left * sx)
                end = fn.stack((top + crop_h) * sy, (left + crop_w) * sx)
            if gpu:
                image = fn.decoders.image(encoded, device="mixed", output_type=types.RGB,
                                          hw_decoder_load=o.hw_decoder_load)
            else:
                image = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
            # DALI's size, like its ROI, is (y, x): (height, width).
            return fn.resize(image, size=(crop_h, crop_w), roi_start=start, roi_end=end, roi_relative=False,
                             antialias=True, interp_type=types.INTERP_LINEAR, dtype=types.UINT8), ids

        return graph()

    def _build(self) -> None:
        start = time.perf_counter()
        try:
            pipe = self._graph()
            pipe.build()
            # Prime the prefetch queue once (DALI's first run consumes `prefetch` inputs), so
            # that afterwards every scheduled run takes exactly one fed batch.
            warm = DecodeInput([_tiny_jpeg()], [(0.0, 0.0, 16.0, 16.0)])
            self._inputs.clear()
            for _ in range(self.options.prefetch):
                self._inputs.append(self._source_item(warm, -1))  # -1: no caller's batch
            pipe.schedule_run()
            for _ in range(self.options.prefetch):
                pipe.share_outputs()
                pipe.release_outputs()
        except Exception as e:  # DALI raises RuntimeError for a missing device, driver or library
            raise EngineError(f"cannot build the DALI {self.options.device} decoder ({_first_line(e)}); "
                              f"{'check the GPU and driver, or pass --decode cpu' if self.options.device == 'gpu' else DALI_HINT}") from e
        self._pipe = pipe
        _LOG.info("DALI %s decoder ready in %.2f s (batch %d, resize %d, crop %dx%d%s)", self.options.device,
                  time.perf_counter() - start, self.options.max_batch, self.options.resize, *self.options.crop_size,
                  f", hw_decoder_load {self.options.hw_decoder_load}" if self.options.device == "gpu" else "")

    def _source_item(self, batch: "DecodeInput", number: int):
        """One run's inputs: the encoded files as a list (each its own length), the rest as one array each, whose
        rows are the samples. DALI's feed checks and wraps each list entry in Python (~13 us an image for four
        lists on the VM, more beside busy threads) and takes an array whole."""
        n = len(batch.encoded)
        ids = np.empty((n, 2), np.int64)
        ids[:, 0] = number
        ids[:, 1] = np.arange(n)
        if self.options.crop_box == "graph":
            return (list(batch.encoded), ids)
        if batch.boxes is None or len(batch.boxes) != n:
            raise EngineError("the DALI decoder (crop_box='host') needs one crop box per image")
        try:
            boxes = np.asarray(batch.boxes, np.float32)  # (left, top, right, bottom) per image
        except (TypeError, ValueError):  # ragged or not numbers
            boxes = np.empty((0,))
        if boxes.shape != (n, 4):
            raise EngineError(f"the DALI decoder (crop_box='host') needs one crop box per image, 4 numbers each "
                              f"(left, top, right, bottom); got {len(batch.boxes)} boxes for {n} images, not all "
                              f"4 numbers")
        if not np.isfinite(boxes).all():  # DALI's CPU backend waits forever on a NaN crop window
            raise EngineError(f"the DALI decoder's crop boxes must be finite numbers, got "
                              f"{boxes[~np.isfinite(boxes).all(axis=1)][:1].tolist()[0]} (left, top, right, bottom): "
                              f"compute them with images.pillow_decoder.crop_box from the image's size")
        starts = np.ascontiguousarray(boxes[:, [1, 0]])  # DALI wants (y, x)
        ends = np.ascontiguousarray(boxes[:, [3, 2]])
        return (list(batch.encoded), starts, ends, ids)

    def _schedule(self, batch: "DecodeInput") -> int:
        """Feeds ``batch`` and schedules its run; returns the batch's number (its images' ids say it)."""
        number = next(self._batch_numbers)
        self._inputs.append(self._source_item(batch, number))
        try:
            self._pipe.schedule_run()
        except BaseException:
            self._inputs.clear()
            raise
        return number

    def _take(self):
        """The next run's (images, ids): images where DALI left them, ids as int64 (n, 2) on the host."""
        out, ids = self._pipe.share_outputs()  # host-synchronous: the data is ready for any stream
        ids = np.array(ids.as_cpu().as_tensor())
        if self.options.device == "gpu":
            return out.as_tensor(), ids
        return np.array(out.as_tensor()), ids

    def _take_host(self):
        """As :meth:`_take`, with the images copied to the host."""
        out, ids = self._pipe.share_outputs()
        return np.array(out.as_cpu().as_tensor()), np.array(ids.as_cpu().as_tensor())

    def _claim(self, images, ids: np.ndarray, number: int, count: int) -> List[int]:
        """Checks that a taken run is the batch this caller fed (its number, one id per image in order)
        and returns the positions the ids name.

        Raises:
            EngineError: another batch's images, or a row count other than the batch's. The pipeline
                is dropped (its queue belongs to someone else's batches) and rebuilt when next used.
        """
        expected = np.stack([np.full(count, number, np.int64), np.arange(count, dtype=np.int64)], axis=1)
        rows = array_info(images).shape[0]
        if ids.shape == expected.shape and (ids == expected).all() and rows == count:
            return ids[:, 1].tolist()
        self._pipe = None
        numbers = sorted(set(ids[:, 0].tolist())) if ids.ndim == 2 and ids.shape[0] else []
        got = "batch " + ", ".join(str(n) for n in numbers) if numbers else "no batch"
        rows_note = "" if rows == ids.shape[0] else f", but {rows} decoded rows"
        raise EngineError(f"the DALI {self.options.device} decoder returned the images of {got} "
                          f"({_plural(ids.shape[0])}{rows_note}) where batch {number} ({_plural(count)}) "
                          f"was expected: two callers used one decoder at once, or the decoder lost a batch. "
                          f"Nothing of either batch was scored; callers must submit their batches to the decoder's "
                          f"one thread (images.decoder_service.DecoderService)")

    def _one_by_one(self, batch: "DecodeInput") -> DecodedBatch:
        """After a failed batch: rebuild, then decode each image alone so only the bad ones fail."""
        images, index, failed = [], [], {}
        for i, data in enumerate(batch.encoded):
            self._rebuild_if_broken()
            try:
                number = self._schedule(DecodeInput([data], None if batch.boxes is None else [batch.boxes[i]]))
                image, ids = self._take_host()
            except Exception as e:  # DALI raises RuntimeError/IndexError and breaks the pipeline
                self._broken(e)
                failed[i] = f"the DALI {self.options.device} decoder failed on this image ({_first_line(e)})"
                continue
            self._claim(image, ids, number, 1)  # raises, not a bad image: outside the except above
            images.append(image)
            self._pipe.release_outputs()
            index.append(i)
        self._rebuild_if_broken()
        stacked = np.concatenate(images) if images else np.zeros((0, *self.options.crop_size, 3), np.uint8)
        return DecodedBatch(stacked, index, failed, 0.0)

    def _broken(self, error: BaseException) -> None:
        """DALI failed, which leaves its pipeline unusable: drop it (rebuilt before its next use),
        and raise at once when the GPU ran out of memory, which no per-image retry can help."""
        self._pipe = None
        oom = out_of_memory_error(error)
        if oom is not None:
            raise oom from error

    def _rebuild_if_broken(self) -> None:
        if self._pipe is None:
            self._inputs.clear()
            self.rebuilds += 1
            _LOG.warning("rebuilding the DALI decoder after a failed batch (rebuild %d)", self.rebuilds)
            self._build()

    def checked(self, batch) -> "DecodeInput":
        """``batch`` as a :class:`DecodeInput` (a plain sequence of encoded arrays is accepted with
        ``crop_box="graph"``), once it is one this decoder can take.

        Raises:
            EngineError: a batch of no or too many images, or without one crop box per image.
        """
        if not isinstance(batch, DecodeInput):
            batch = DecodeInput(list(batch), None)
        if not 1 <= len(batch.encoded) <= self.options.max_batch:
            raise EngineError(f"a decode batch holds 1..{self.options.max_batch} images, got {len(batch.encoded)}")
        if self.options.crop_box == "host" and (batch.boxes is None or len(batch.boxes) != len(batch.encoded)):
            raise EngineError("the DALI decoder (crop_box='host') needs one crop box per image")
        return batch

    def decode(self, batches: Iterable["DecodeInput"]) -> Iterator[DecodedBatch]:
        """Decodes batches in order, up to ``prefetch`` ahead of the one being used.

        Args:
            batches: Each a :class:`DecodeInput` of at most ``max_batch`` images (a plain
                sequence of encoded arrays is accepted with ``crop_box="graph"``).

        Yields:
            One :class:`DecodedBatch` per input batch. A GPU batch's ``images`` stay valid until
            the next one is requested: use (or copy) it before advancing. A stream closed early
            (``close()``, an error) leaves none of its batches in the pipeline.

        Raises:
            EngineError: a batch of no or too many images, or without crop boxes; the GPU ran out
                of memory; or a taken run is not this stream's batch (its ids), which only a second
                caller on the same decoder can cause.
        """
        # Each entry: [batch, its number while it is queued in the live pipeline, else None].
        pending: List[list] = []
        source = iter(batches)
        self._rebuild_if_broken()  # after a failure that was raised (out of memory)
        holding = False  # a taken run that is not released yet

        def queue(entry: list) -> None:
            entry[1] = None
            if self._pipe is not None:
                try:
                    entry[1] = self._schedule(entry[0])
                except Exception as e:  # a broken feed breaks the pipeline: decode it one by one below
                    self._broken(e)

        def schedule_next() -> bool:
            batch = next(source, None)
            if batch is None:
                return False
            entry = [self.checked(batch), None]
            pending.append(entry)
            queue(entry)
            return True

        finished = False
        try:
            for _ in range(self.options.prefetch):
                if not schedule_next():
                    break
            while pending:
                batch, number = pending.pop(0)
                start = time.perf_counter()
                taken = None
                if self._pipe is not None and number is not None:
                    try:
                        taken = self._take()
                    except Exception as e:  # the whole batch failed: find the bad images below
                        self._broken(e)
                        _LOG.warning("DALI failed on a batch of %d (%s); retrying it image by image",
                                     len(batch.encoded), _first_line(e))
                if taken is not None:
                    images, ids = taken
                    holding = True
                    index = self._claim(images, ids, number, len(batch.encoded))
                    yield DecodedBatch(images, index, {}, time.perf_counter() - start)
                    holding = False
                    self._pipe.release_outputs()
                else:
                    result = self._one_by_one(batch)  # leaves a fresh pipeline behind
                    for entry in pending:  # queued on the dead pipeline: queue them again
                        queue(entry)
                    yield result._replace(seconds=time.perf_counter() - start)
                schedule_next()
            finished = True
        finally:
            if not finished:  # an error, or the caller stopped early
                self._settle(holding, sum(number is not None for _, number in pending))

    def _settle(self, holding: bool, queued: int) -> None:
        """Leaves no output of a stream that ended early in the pipeline: releases the run it held
        and takes the runs it queued, so the next stream's first take is its own batch. A pipeline
        that fails at that is dropped (rebuilt when next used)."""
        if self._pipe is None:
            return
        try:
            if holding:
                self._pipe.release_outputs()
            for _ in range(queued):
                self._pipe.share_outputs()
                self._pipe.release_outputs()
        except Exception:  # DALI failed on a queued batch nobody waits for any more
            self._pipe = None

    def close(self) -> None:
        self._pipe = None
        self._inputs.clear()
        self._alive.clear()


def gpu_decode_unavailable() -> Optional[str]:
    """Why GPU decoding cannot run here (None when it can: DALI importable and a CUDA device)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"NVIDIA DALI is not importable ({e})"
    if cuda_device_count() < 1:
        return "no CUDA device is visible"
    return None
