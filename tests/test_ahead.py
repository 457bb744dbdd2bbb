"""transforms/ahead.py: a batch starts scoring as soon as the reader has read it, on the scorer the model
handler loaded in this process, and RunInference takes that result only for that batch, from that model.

The reader is the real ``ReadImageBatches`` on real PNG files, the scorer a real ``ImageScorer`` around the
fake engine of test_inference.py, whose logits are each image's mean colour: a row tells which image it
came from. The whole job with the real model is in test_scoring.py.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import logging
import threading
import time

import numpy as np
import pytest

from images.pillow_decoder import PreprocessConfig
from images.scoring import ImageScorer
from tests.conftest import run_bundle
from tests.test_inference import CROP, FakeEngine, _handler, _pixels, _png
from transforms import ahead
from transforms.images import ImageBatch, ImageRef, ReadImageBatches

CONFIG = PreprocessConfig(resize=CROP, crop=CROP)


@pytest.fixture
def photos(tmp_path):
    """Twelve small PNGs, each one grey value: ``{uri: value}``."""
    out = {}
    for i in range(12):
        value = 10 + 20 * i
        path = tmp_path / f"grey{value:03d}.png"
        path.write_bytes(_png(value))
        out[str(path)] = value
    return out


@pytest.fixture
def scorer():
    scorer = ImageScorer(FakeEngine())
    yield scorer
    scorer.close()


def _read(reader: ReadImageBatches, batches):
    """Runs the reader's bundle as Beam would, on one thread: its main outputs (no window: plain values)."""
    return [o for o in run_bundle(reader, batches) if isinstance(o, ImageBatch)]


@contextlib.contextmanager
def _registered(token: str, scorer: ImageScorer):
    """``scorer`` registered under ``token`` for the block, then unregistered."""
    ahead.register(token, scorer, ["logits"])
    try:
        yield scorer
    finally:
        ahead.unregister(token)


def _grey(rows: np.ndarray):
    return [int(round(float(r[0]))) for r in rows]


def test_the_reader_starts_each_batch_on_the_registered_scorer_with_its_own_images(photos, scorer):
    token = "test-reader-starts"
    with _registered(token, scorer):
        refs = [ImageRef(uri) for uri in photos]
        batches = _read(ReadImageBatches(CONFIG, threads=2, prefetch=2, score_ahead=token),
                        [refs[i:i + 4] for i in range(0, len(refs), 4)])
    assert [len(b) for b in batches] == [4, 4, 4]
    for batch in batches:
        assert isinstance(batch.scoring, ahead.Started) and batch.scoring.scorer is scorer
        scored = batch.scoring.future.result(timeout=30)
        assert scored.failed == {}
        assert _grey(scored.outputs["logits"]) == [photos[ref.uri] for ref in batch.refs]


def test_without_a_registered_scorer_or_token_batches_are_read_as_before(photos, scorer):
    refs = [ImageRef(uri) for uri in photos][:4]
    for reader in (ReadImageBatches(CONFIG, threads=2, score_ahead="nobody-registered-this"),
                   ReadImageBatches(CONFIG, threads=2)):
        (batch,) = _read(reader, [refs])
        assert batch.scoring is None and [r.uri for r in batch.refs] == [r.uri for r in refs]


def test_a_batch_whose_read_stalled_is_emitted_without_a_started_scoring(photos, scorer, tmp_path, monkeypatch):
    # A stalled read is given up (read_timeout_s) and the rest of its chunk read by another thread: the batch
    # then holds other results than any the reader threads finished, so nothing started may be taken for it.
    import images.reading as reading

    fifo = str(tmp_path / "stuck.png")
    os.mkfifo(fifo)
    monkeypatch.setattr(reading, "regular_file_size", lambda path: (None, None))  # read it, as a stuck mount would
    token = "test-stalled"
    good = [ImageRef(uri) for uri in photos][:3]
    try:
        with _registered(token, scorer):
            # Two chunks, [stuck, good 0] and [good 1, good 2]: the rest of the first goes to the free thread.
            (batch,) = _read(ReadImageBatches(CONFIG, threads=2, read_timeout_s=0.5, score_ahead=token),
                             [[ImageRef(fifo), *good]])
    finally:
        os.close(os.open(fifo, os.O_WRONLY))  # the thread left behind reads end of file and finishes
    assert batch.scoring is None
    assert [r.uri for r in batch.refs] == [r.uri for r in good]


def test_pickling_a_batch_drops_its_started_scoring(scorer):
    batch = ImageBatch((ImageRef("/p/a.png"),), _pixels([7]))
    batch.scoring = ahead.Started(scorer, scorer.score_ahead((batch.pixels, (), None)))
    batch.scoring.future.result(timeout=30)
    copy = pickle.loads(pickle.dumps(batch))
    assert copy.scoring is None and copy.refs == batch.refs and np.array_equal(copy.pixels, batch.pixels)
    assert batch.scoring is not None  # the original keeps it


def test_a_scorer_nobody_holds_or_a_closed_one_starts_nothing():
    token = "test-weak"
    scorer = ImageScorer(FakeEngine())
    ahead.register(token, scorer, ["logits"])
    batch = ImageBatch((ImageRef("/p/a.png"),), _pixels([7]))
    try:
        assert ahead.scorer_for(token) is scorer
        scorer.close()
        assert ahead.start(token, batch) is None  # refused: RunInference scores it and says why
        del scorer
        gc.collect()
        assert ahead.scorer_for(token) is None and ahead.start(token, batch) is None
    finally:
        ahead.unregister(token)


class _CountingEngine(FakeEngine):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self._lock = threading.Lock()

    def infer(self, feed, outputs=None):
        with self._lock:
            self.calls += 1
        return super().infer(feed, outputs)


def test_run_inference_takes_a_started_result_only_from_its_own_model(tmp_path):
    handler = _handler(tmp_path, score_ahead="test-run-inference")
    model = ImageScorer(_CountingEngine())
    other = ImageScorer(FakeEngine())
    try:
        mine = ImageBatch((ImageRef("/p/ten.png"), ImageRef("/p/twenty.png")), _pixels([10, 20]))
        mine.scoring = ahead.Started(model, model.score_ahead((mine.pixels, (), None), ["logits"]))
        mine.scoring.future.result(timeout=30)
        # Started on another model (a reloaded one): its result, here another batch's rows, must not be taken.
        theirs = ImageBatch((ImageRef("/p/thirty.png"),), _pixels([30]))
        theirs.scoring = ahead.Started(other, other.score_ahead((_pixels([99]), (), None), ["logits"]))
        plain = ImageBatch((ImageRef("/p/forty.png"),), _pixels([40]))
        calls_before = model.engine.calls
        out = handler.run_inference([mine, theirs, plain], model)
        assert model.engine.calls - calls_before == 2  # theirs and plain, in one score() call: one engine call each
        assert [[(r.uri, g) for r, g in zip(s.refs, _grey(s.outputs["logits"]))] for s in out] == [
            [("/p/ten.png", 10), ("/p/twenty.png", 20)], [("/p/thirty.png", 30)], [("/p/forty.png", 40)]]
    finally:
        model.close()
        other.close()


def test_run_inference_raises_what_scoring_a_started_batch_raised(tmp_path):
    from engines.base import EngineError

    handler = _handler(tmp_path)
    model = ImageScorer(FakeEngine(extra_rows=1))  # a broken engine: one row too many
    try:
        batch = ImageBatch((ImageRef("/p/ten.png"),), _pixels([10]))
        batch.scoring = ahead.Started(model, model.score_ahead((batch.pixels, (), None), ["logits"]))
        with pytest.raises(EngineError, match="batch dimension 2 does not match the 1 images fed"):
            handler.run_inference([batch], model)
    finally:
        model.close()


def test_the_handler_registers_what_it_loads_unless_the_model_is_shared_across_processes(tmp_path):
    handler = _handler(tmp_path, score_ahead="test-handler-registers")
    model = handler.load_model()
    try:
        assert ahead.scorer_for("test-handler-registers") is model
    finally:
        ahead.unregister("test-handler-registers")
        model.close()
    shared = _handler(tmp_path, score_ahead="test-handler-shared", share_across_processes=True)
    model = shared.load_model()  # loaded here directly; under Beam a proxy of another process
    try:
        assert ahead.scorer_for("test-handler-shared") is None
    finally:
        model.close()


class _SlowEngine(FakeEngine):
    """The fake engine taking ``delay`` s a call, serving ``calls`` at once, and counting the most that ran at once."""

    def __init__(self, delay: float = 0.3, calls: int = 1):
        super().__init__()
        self.delay, self.calls, self.running, self.most = delay, calls, 0, 0
        self._lock = threading.Lock()

    def concurrent_calls(self) -> int:
        return self.calls

    def infer(self, feed, outputs=None):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.delay)
            return super().infer(feed, outputs)
        finally:
            with self._lock:
                self.running -= 1


@pytest.mark.parametrize("calls", [1, 2])
def test_batches_started_ahead_run_as_many_engine_calls_at_once_as_the_engine_serves(calls):
    # Two sessions (the local CPU default on 8+ cores) ran two bundle threads' calls at once before batches were
    # scored ahead; started ahead they must too, and never more than the engine serves.
    scorer = ImageScorer(_SlowEngine(calls=calls))
    try:
        futures = [scorer.score_ahead((_pixels([10 * i + 1]), (), None), ["logits"]) for i in range(4)]
        got = [_grey(f.result(timeout=30).outputs["logits"]) for f in futures]
    finally:
        scorer.close()
    assert got == [[1], [11], [21], [31]]
    assert scorer.engine.most == calls


def test_the_latency_recorded_for_a_batch_scored_ahead_is_its_scoring_not_the_wait(tmp_path):
    handler = _handler(tmp_path)
    model = ImageScorer(_SlowEngine(delay=0.3))
    recorded = []

    class Histogram:
        def record(self, seconds):
            recorded.append(seconds)

    handler._histogram = Histogram()
    try:
        batch = ImageBatch((ImageRef("/p/a.png"),), _pixels([7]))
        batch.scoring = ahead.Started(model, model.score_ahead((batch.pixels, (), None), ["logits"]))
        batch.scoring.future.result(timeout=30)  # done while the bundle thread wrote earlier rows: no wait
        handler.run_inference([batch], model)
    finally:
        model.close()
    assert recorded[0] >= 0.25, recorded  # stats.json's batch latency percentiles are made of these


def test_batches_started_and_never_taken_turn_scoring_ahead_off_with_a_warning(caplog):
    # A runner that encodes every batch between reading and RunInference: each started scoring is dropped
    # untaken (its batch pickled without it) and RunInference scores the copy again. After a few, the process
    # stops starting them rather than scoring every batch twice.
    token = "test-untaken"
    batch = ImageBatch((ImageRef("/p/a.png"),), _pixels([7]))
    with _registered(token, ImageScorer(_CountingEngine())) as scorer, contextlib.closing(scorer):
        started = 0
        with caplog.at_level(logging.WARNING, logger="transforms.ahead"):
            for _ in range(3 * ahead.MAX_UNTAKEN):
                s = ahead.start(token, batch)
                if s is None:
                    continue
                started += 1
                s.future.result(timeout=30)
                del s  # dropped untaken, as the batch it belonged to was
        assert started == ahead.MAX_UNTAKEN
        assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
        assert "never taken by RunInference" in caplog.records[0].message
        assert "--no_score_ahead" in caplog.records[0].message


def test_started_scorings_that_are_taken_keep_scoring_ahead_on():
    token = "test-taken"
    batch = ImageBatch((ImageRef("/p/a.png"),), _pixels([7]))
    with _registered(token, ImageScorer(FakeEngine())) as scorer, contextlib.closing(scorer):
        for i in range(3 * ahead.MAX_UNTAKEN):
            s = ahead.start(token, batch)
            assert s is not None, f"scoring ahead went off after {i} batches, every one taken"
            s.take()


def test_a_started_scoring_the_closed_scorer_dropped_is_scored_by_run_inference(tmp_path):
    import concurrent.futures

    handler = _handler(tmp_path)
    model = ImageScorer(FakeEngine())
    try:
        batch = ImageBatch((ImageRef("/p/ten.png"),), _pixels([10]))
        dropped = concurrent.futures.Future()
        dropped.cancel()
        batch.scoring = ahead.Started(model, dropped)
        (out,) = handler.run_inference([batch], model)
        assert _grey(out.outputs["logits"]) == [10]
    finally:
        model.close()


def test_a_batch_made_from_another_by_replace_does_not_carry_its_started_scoring(scorer):
    import dataclasses

    batch = ImageBatch((ImageRef("/p/a.png"),), _pixels([7]))
    batch.scoring = ahead.Started(scorer, scorer.score_ahead((batch.pixels, (), None), ["logits"]))
    other = dataclasses.replace(batch, pixels=_pixels([99]))
    assert other.scoring is None


class _FailsOn99(FakeEngine):
    """Refuses a batch holding a grey-99 image: one bad batch (an engine error) fails its whole call."""

    def infer(self, feed, outputs=None):
        from engines.base import EngineError

        if (np.asarray(feed["images"]) == 99).any():
            raise EngineError("engine failed on this batch")
        return super().infer(feed, outputs)


def test_calls_that_fail_count_their_started_batches_as_taken_and_keep_scoring_ahead_on(tmp_path):
    # A failed call sends its batches to failed_inferences: the others of the call were scored once and
    # dead-lettered, not scored twice, so they must not turn scoring ahead off.
    from engines.base import EngineError

    token = "test-failed-calls"
    handler = _handler(tmp_path, score_ahead=token, batches_per_call=8)
    with _registered(token, ImageScorer(_FailsOn99())) as scorer, contextlib.closing(scorer):
        for call in range(3):
            batches = [ImageBatch((ImageRef(f"/p/{call}-{i}.png"),), _pixels([99 if i == 0 else 10 + i]))
                       for i in range(8)]
            for b in batches:
                b.scoring = ahead.start(token, b)
                assert b.scoring is not None
            with pytest.raises(EngineError, match="engine failed on this batch"):
                handler.run_inference(batches, scorer)
            del batches, b
            gc.collect()
        assert ahead.start(token, ImageBatch((ImageRef("/p/fresh.png"),), _pixels([5]))) is not None, (
            "three failed calls turned scoring ahead off")


def test_files_read_together_for_the_decoder_start_scoring_with_their_own_images(photos):
    # The GPU path's reader: local files read together by DALI, left encoded, each batch started on the scorer as
    # soon as its chunk is read. Each row must come from its own image.
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")
    from images.pillow_decoder import preprocess_image

    scorer = ImageScorer(FakeEngine(), None, lambda data: preprocess_image(data, CONFIG))
    token = "test-read-together"
    try:
        with _registered(token, scorer):
            refs = [ImageRef(uri, size=os.stat(uri).st_size) for uri in photos]
            batches = _read(ReadImageBatches(CONFIG, gpu_decode=True, threads=2, prefetch=2, score_ahead=token),
                            [refs[i:i + 4] for i in range(0, len(refs), 4)])
            assert [len(b.encoded) for b in batches] == [4, 4, 4]
            for batch in batches:
                assert isinstance(batch.scoring, ahead.Started)
                scored = batch.scoring.future.result(timeout=30)
                assert scored.failed == {}
                assert _grey(scored.outputs["logits"]) == [photos[ref.uri] for ref in batch.refs]
    finally:
        scorer.close()


def _cyclic_garbage(types) -> dict:
    """How many objects of each of ``types`` only the garbage collector could free (unreachable, in cycles)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = {t.__name__: sum(isinstance(o, t) for o in gc.garbage) for t in types}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found


def test_a_read_batch_and_its_scoring_are_freed_without_the_garbage_collector(photos, scorer):
    # Each read batch's futures, chunks (holding every file's bytes), the batch and its started scoring must go
    # when the last reference to them does. A cycle (a future's done callback closing over the futures) kept them
    # for the collector: ~11 MB of file bytes per 256-image batch held until a full collection, which then held
    # the GIL for ~0.15 s on the GPU job's threads.
    import concurrent.futures

    from transforms.images import _Ahead, _Chunk

    token = "test-freed-without-gc"
    gc.collect()
    gc.disable()
    try:
        with _registered(token, scorer):
            refs = [ImageRef(uri) for uri in photos]
            batches = _read(ReadImageBatches(CONFIG, threads=2, prefetch=2, score_ahead=token),
                            [refs[i:i + 4] for i in range(0, len(refs), 4)])
            assert len(batches) == 3
            for batch in batches:
                assert batch.scoring.take().failed == {}
            del batches, batch
        left = _cyclic_garbage((_Ahead, _Chunk, ImageBatch, ahead.Started, concurrent.futures.Future))
    finally:
        gc.enable()
    assert left == {"_Ahead": 0, "_Chunk": 0, "ImageBatch": 0, "Started": 0, "Future": 0}
