"""The decoder service: one DALI decoder on a thread of its own, decoding the batches of every caller in turn
and handing each its own (real DALI decoders on the CPU; the GPU copy-out is in tests/gpu)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from engines.base import EngineError
from tests.test_scoring import BROKEN, _item, distinct_jpegs

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")

HANG_S = 90


def _decode_input(item):
    from images.dali_decoder import DecodeInput

    _, files, boxes = item
    return DecodeInput([np.frombuffer(f, np.uint8) for f in files], boxes)


def _options(**kwargs):
    from images.dali_decoder import DaliDecoderOptions

    return DaliDecoderOptions(**{"device": "cpu", "max_batch": 4, "threads": 1, **kwargs})


@pytest.fixture(scope="module")
def batches():
    """Twelve batches of three different photos each; the fifth holds a broken file in the middle."""
    photos = iter(distinct_jpegs(36, seed=3))
    out = []
    for b in range(12):
        files = [next(photos) for _ in range(3)]
        if b == 4:
            files[1] = BROKEN
        out.append(_decode_input(_item(files)))
    return out


@pytest.fixture(scope="module")
def alone(batches):
    """Each batch decoded by a decoder of its own, one caller: the reference."""
    from images.dali_decoder import DaliDecoder

    decoder = DaliDecoder(_options())
    try:
        return [(np.array(d.images), list(d.index), dict(d.failed)) for d in decoder.decode(batches)]
    finally:
        decoder.close()


def _same(got, want) -> bool:
    return np.array_equal(np.asarray(got.images), want[0]) and list(got.index) == want[1] and dict(got.failed) == want[2]


def test_callers_on_four_threads_each_get_their_own_batches(batches, alone):
    from images.decoder_service import DecoderService

    service = DecoderService(_options(prefetch=2))
    results, errors = {}, {}
    start = threading.Barrier(4)

    def caller(t):
        start.wait()
        mine = list(range(t, len(batches), 4))
        try:
            for _ in range(3):  # each caller runs its stream three times: nine streams interleave
                stream = service.decode([batches[i] for i in mine], ahead=2)
                results.setdefault(t, []).append([(i, got) for i, got in zip(mine, stream)])
        except Exception as e:
            errors[t] = e

    threads = [threading.Thread(target=caller, args=(t,), daemon=True) for t in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG_S)
        assert not any(thread.is_alive() for thread in threads), "a caller waited forever for its batch"
    finally:
        service.close()
    assert not errors
    wrong = [(t, i) for t, runs in results.items() for run in runs for i, got in run if not _same(got, alone[i])]
    assert not wrong and sum(len(run) for runs in results.values() for run in runs) == 3 * len(batches)
    assert alone[4][2] and 1 in alone[4][2]  # the broken file failed alone, in its own caller's batch


def test_a_stream_closed_early_leaves_the_next_callers_batches_their_own(batches, alone):
    from images.decoder_service import DecoderService

    service = DecoderService(_options(prefetch=3))
    try:
        stream = service.decode(batches[:6], ahead=4)
        assert _same(next(stream), alone[0])
        stream.close()  # three batches queued and not taken
        assert [_same(got, alone[6 + i]) for i, got in enumerate(service.decode(batches[6:]))] == [True] * 6
    finally:
        service.close()


def test_a_bad_request_is_refused_at_submit_and_never_reaches_the_shared_stream(batches, alone):
    from images.dali_decoder import DecodeInput
    from images.decoder_service import DecoderService

    service = DecoderService(_options())
    try:
        too_many = DecodeInput(list(batches[0].encoded) * 2, list(batches[0].boxes) * 2)
        with pytest.raises(EngineError, match=r"a decode batch holds 1..4 images, got 6"):
            service.submit(too_many)
        with pytest.raises(EngineError, match="needs one crop box per image"):
            service.submit(DecodeInput(batches[0].encoded, None))
        assert _same(service.submit(batches[1]).result(HANG_S), alone[1])
    finally:
        service.close()
    with pytest.raises(EngineError, match="closed"):
        service.submit(batches[1])
    assert not service._thread.is_alive()


def test_decoders_spread_calls_and_refuse_fewer_than_one(batches, alone):
    from images.decoder_service import Decoders

    with pytest.raises(EngineError, match=r"--max_decoders must be >= 1 .*got 0"):
        Decoders(_options(), 0)
    decoders = Decoders(_options(), 2)
    try:
        assert len({id(s._decoder) for s in decoders.services}) == 2
        assert [_same(got, alone[i]) for i, got in enumerate(decoders.decode(batches))] == [True] * len(batches)
    finally:
        decoders.close()
    assert all(s._decoder._pipe is None for s in decoders.services)


def test_a_decoder_that_cannot_be_built_fails_at_construction_and_leaves_no_thread():
    from images.decoder_service import Decoders

    before = threading.active_count()
    # There is no GPU 99 (nor any GPU in CI): the build fails, as on a worker with a broken driver.
    with pytest.raises(EngineError, match="cannot build the DALI gpu decoder"):
        Decoders(_options(device="gpu", device_id=99), 2)
    assert threading.active_count() == before


class _Broken(Exception):
    pass


def test_a_request_taken_when_the_decoder_cannot_rebuild_fails_instead_of_hanging(batches, alone):
    """An out-of-memory failure drops the DALI pipeline; when the next stream's rebuild fails too, the request
    that started that stream must get the error (its caller waited forever before), and the next one decodes."""
    from images.decoder_service import DecoderService

    service = DecoderService(_options())
    decoder = service._decoder
    real_build = decoder._build
    try:
        decoder._pipe = None  # what DaliDecoder._broken leaves behind

        def build():
            raise EngineError("cannot build the DALI gpu decoder (CUDA error: out of memory)")

        decoder._build = build
        with pytest.raises(EngineError, match="out of memory"):
            service.submit(batches[0]).result(HANG_S / 3)
        decoder._build = real_build
        assert _same(service.submit(batches[1]).result(HANG_S), alone[1])
    finally:
        service.close()


def test_when_the_decoder_thread_dies_its_callers_get_the_cause_and_close_frees_the_decoder(batches):
    from images.decoder_service import DecoderService

    service = DecoderService(_options())

    def dying(source):  # any BaseException on the thread: a failed cudaSetDevice, an interpreter exit
        next(iter(source))
        raise SystemExit("the thread was told to exit")
        yield

    service._decoder.decode = dying
    with pytest.raises(SystemExit):
        service.submit(batches[0]).result(HANG_S / 3)
    service._thread.join(HANG_S / 3)
    assert not service._thread.is_alive()
    with pytest.raises(EngineError, match="the DALI decoder thread stopped.*told to exit"):
        service.submit(batches[1])
    service.close()
    assert service._decoder._pipe is None  # closed, not left for the garbage collector


def _counting_service(options, pool_cap=None):
    """A service whose decoded batches are held in stand-in device buffers (no GPU here), counted."""
    from images.decoder_service import DecoderService, DeviceImages, _BufferPool

    class Service(DecoderService):
        def _owned(self, decoded):
            buffer = self._pool.take()
            return decoded._replace(images=DeviceImages(self._pool, buffer, np.asarray(decoded.images).shape))

    class Pool(_BufferPool):
        made = 0
        given_back = 0

        def _new(self):
            Pool.made += 1
            return type("Buffer", (), {"ptr": 1, "free": lambda self: None})()

        def give_back(self, buffer):
            Pool.given_back += 1
            super().give_back(buffer)

    service = Service(options)
    service._pool = Pool(64, **({"cap": pool_cap} if pool_cap else {}))
    return service, Pool


def test_a_stream_that_cannot_queue_its_next_batch_releases_the_one_it_had_decoded(batches):
    from images.dali_decoder import DecodeInput

    service, pool = _counting_service(_options())
    too_many = DecodeInput(list(batches[0].encoded) * 2, list(batches[0].boxes) * 2)
    try:
        with pytest.raises(EngineError, match="a decode batch holds 1..4 images"):
            list(service.decode([batches[0], too_many], ahead=1))
    finally:
        service.close()
    assert pool.made == 1 and pool.given_back == 1


def test_the_buffers_are_capped_and_the_decoder_waits_for_one_to_come_back(batches, alone):
    service, pool = _counting_service(_options(), pool_cap=2)
    try:
        futures = [service.submit(b) for b in batches[:3]]
        first, second = futures[0].result(HANG_S), futures[1].result(HANG_S)
        with pytest.raises(TimeoutError):
            futures[2].result(2)  # both buffers are held: the third batch waits
        first.images.release()
        third = futures[2].result(HANG_S)
        assert pool.made == 2 and list(third.index) == alone[2][1]
        second.images.release()
        third.images.release()
    finally:
        service.close()


def test_calls_go_to_a_working_decoder_when_another_has_stopped(batches, alone):
    from images.decoder_service import Decoders

    decoders = Decoders(_options(), 2)
    try:
        stopped = decoders.services[0]
        stopped._failure = RuntimeError("its thread stopped")  # as _serve records a fatal error
        assert not stopped.alive and decoders.services[1].alive
        assert [_same(got, alone[i]) for i, got in enumerate(decoders.decode(batches[:3]))] == [True] * 3
        stopped._failure = None
    finally:
        decoders.close()


def test_a_batch_its_caller_took_and_dropped_is_freed_while_the_decoder_stream_goes_on(batches):
    # Scoring ahead keeps the decoder's queue full from the reader threads, so when decoding is the slowest
    # step one stream spans the whole job: it must not keep every batch it answered (the encoded files and
    # the decoded images) until it ends, or a 200,000-image job holds them all.
    import gc
    import weakref

    from images.decoder_service import DecoderService

    service = DecoderService(_options())
    futures = []
    try:
        futures = [service.submit(batches[i % 4]) for i in range(60)]  # the queue stays full
        futures[0].result(timeout=HANG_S)
        taken = futures[1].result(timeout=HANG_S)
        images = weakref.ref(taken.images)
        del taken, futures[1]  # taken, scored and dropped by its caller
        futures[4].result(timeout=HANG_S)  # the stream has moved on
        gc.collect()
        still_decoding = not futures[-1].done()
        alive = images() is not None
    finally:
        for f in futures:
            f.result(timeout=HANG_S)
        service.close()
    assert still_decoding, "the stream ended before the check: submit more"
    assert not alive, "the decoder's stream kept a batch its caller had taken and dropped"
