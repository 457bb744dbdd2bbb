"""transforms/inference.py: the model handler behind RunInference, on Beam's TestPipeline with a fake
:class:`engines.base.Engine`.

The fake's logits are each image's mean colour, so a row tells which image it came from: the tests
check that every batch comes back with its own refs, rows in order, failed images left out of the
rows, and that the handler stays a picklable recipe until RunInference loads it on the worker. The
real engines are tested against the real model in test_onnxruntime_engine.py and tests/gpu.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to
from PIL import Image

from engines.base import Engine, EngineError, TensorSpec, check_feed
from transforms.images import ImageBatch, ImageRef
from transforms.inference import ImageBatchHandler, ScoredBatch, ScorerLoader

CROP = 8


class FakeEngine(Engine):
    """``images`` uint8 [N, 8, 8, 3] -> ``logits`` float32 [N, 3]: each image's mean colour.

    Args:
        extra_rows: Rows added to every output, as a broken engine would. Default 0.
    """

    kind = "fake"

    def __init__(self, extra_rows: int = 0, log: str = ""):
        self.log = log
        self._inputs = {"images": TensorSpec("images", np.uint8, (-1, CROP, CROP, 3))}
        self._outputs = {"logits": TensorSpec("logits", np.float32, (-1, 3))}
        self._extra_rows = extra_rows

    def close(self):
        if self.log:
            with open(self.log, "a") as f:
                f.write("closed\n")

    def infer(self, feed, outputs=None):
        rows = check_feed(self.input_specs, feed) + self._extra_rows
        images = np.asarray(feed["images"], np.float32)
        logits = np.zeros((rows, 3), np.float32)
        logits[:len(images)] = images.reshape(len(images), -1, 3).mean(axis=1)
        return {name: logits for name in self._output_names(outputs)}


class FakeLoader:
    """A picklable engine loader that appends a line to ``log`` each time it loads an engine (and its engine
    one when it is closed); ``fail`` makes the load raise that message instead."""

    def __init__(self, log: str, extra_rows: int = 0, fail: str = ""):
        self.log, self.extra_rows, self.fail = log, extra_rows, fail

    def __call__(self):
        if self.fail:
            raise EngineError(self.fail)
        with open(self.log, "a") as f:
            f.write("loaded\n")
        return FakeEngine(self.extra_rows, self.log)

    def __repr__(self):
        return "FakeLoader()"


def _loads(log: Path, what: str = "loaded") -> int:
    return log.read_text().splitlines().count(what) if log.exists() else 0


def _pixels(values):
    """One 8x8 image per value, every pixel that grey."""
    return np.stack([np.full((CROP, CROP, 3), v, np.uint8) for v in values])


def _batch(name: str, values) -> ImageBatch:
    return ImageBatch(tuple(ImageRef(f"/photos/{name}-{v}.jpg") for v in values), _pixels(values))


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((CROP * 2, CROP * 3, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(scored: ScoredBatch):
    """(uri, the grey value its logits row says) per scored image, and the failed uris with reasons."""
    return ([(ref.uri, round(float(row[0]))) for ref, row in zip(scored.scored_refs(), scored.outputs["logits"])],
            {scored.refs[i].uri: reason for i, reason in scored.failed.items()})


def _one_message(pattern: str):
    """An ``assert_that`` matcher: exactly one message, matching ``pattern``."""
    def match(messages):
        if len(messages) != 1 or not re.search(pattern, messages[0]):
            raise BeamAssertException(f"expected one failure matching {pattern!r}, got {messages}")
    return match


def _handler(tmp_path, **kwargs) -> ImageBatchHandler:
    loader = ScorerLoader(FakeLoader(str(tmp_path / "loads.log"), kwargs.pop("extra_rows", 0)),
                          preprocess=kwargs.pop("preprocess", None))
    return ImageBatchHandler(loader, ("logits",), images_per_batch=4, **kwargs)


@pytest.mark.parametrize("batches_per_call", [1, 2])
def test_each_batch_comes_back_with_its_own_refs_and_rows_in_order(tmp_path, batches_per_call):
    batches = [_batch("a", [10, 20, 30, 40]), _batch("b", [50, 60]), _batch("c", [70, 80, 90, 100]),
               _batch("d", [110])]
    want = [([(ref.uri, int(v)) for ref, v in zip(b.refs, b.pixels[:, 0, 0, 0])], {}) for b in batches]
    with TestPipeline() as p:
        scored = (p | beam.Create(batches, reshuffle=False)
                  | RunInference(_handler(tmp_path, batches_per_call=batches_per_call)))
        assert_that(scored | beam.Map(_rows), equal_to(want))


def test_images_that_cannot_be_decoded_are_failed_and_the_rest_stay_paired(tmp_path):
    # Encoded files reach a scorer without a GPU decoder: the CPU fallback decodes them after the pixel rows.
    from images.pillow_decoder import PreprocessConfig

    refs = tuple(ImageRef(f"/photos/{name}") for name in ("p5.jpg", "p15.jpg", "e200.png", "text.jpg", "e100.png"))
    batch = ImageBatch(refs, _pixels([5, 15]), (_png(200), b"just some text, not an image\n", _png(100)))
    handler = _handler(tmp_path, preprocess=PreprocessConfig(resize=CROP, crop=CROP))

    def check(results):
        ((rows, failed),) = [_rows(scored) for scored in results]
        assert rows == [("/photos/p5.jpg", 5), ("/photos/p15.jpg", 15), ("/photos/e200.png", 200),
                        ("/photos/e100.png", 100)]
        assert list(failed) == ["/photos/text.jpg"] and "not an image" in failed["/photos/text.jpg"]

    with TestPipeline() as p:
        assert_that(p | beam.Create([batch]) | RunInference(handler), check)


def test_an_engine_output_that_does_not_pair_with_its_images_fails_the_batch_naming_the_output(tmp_path):
    handler = _handler(tmp_path, extra_rows=1)
    with TestPipeline() as p:
        main, failed = (p | beam.Create([_batch("a", [1, 2, 3])])
                        | RunInference(handler).with_exception_handling())
        assert_that(main, equal_to([]), label="no rows")
        assert_that(failed.failed_inferences | beam.Map(lambda failure: str(failure[1])),
                    _one_message(r"Output tensor: logits \| batch dimension 4 does not match the 3 images"),
                    label="named")


def test_the_handler_is_a_recipe_until_run_inference_loads_it_on_the_worker(tmp_path):
    handler = _handler(tmp_path)
    copy = pickle.loads(pickle.dumps(handler))  # what Beam ships to the workers
    assert _loads(tmp_path / "loads.log") == 0, "building or pickling the handler loaded an engine"
    with TestPipeline() as p:
        assert_that(p | beam.Create([_batch("a", [7])]) | RunInference(copy) | beam.Map(_rows),
                    equal_to([([("/photos/a-7.jpg", 7)], {})]))
    assert _loads(tmp_path / "loads.log") >= 1


def test_metrics_count_images_per_device_engine_batches_and_one_latency_per_call(tmp_path):
    from apache_beam.metrics.metric import MetricsFilter

    from transforms.timing import HISTOGRAM_PREFIX, NAMESPACE, device_counter

    batches = [_batch("a", [1, 2, 3, 4]), _batch("b", [5, 6, 7]), _batch("c", [8, 9]), _batch("d", [10])]
    p = TestPipeline()
    _ = p | beam.Create(batches, reshuffle=False) | RunInference(_handler(tmp_path, batches_per_call=2))
    result = p.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counters = {m.key.metric.name: m.committed for m in metrics["counters"]}
    distributions = {m.key.metric.name: m.committed for m in metrics["distributions"]}
    assert counters[device_counter(None)] == 10  # stats.json's images_per_device
    assert counters["batches"] == 4 and distributions["batch_size"].sum == 10
    assert sum(n for name, n in counters.items() if name.startswith(HISTOGRAM_PREFIX)) == 2  # 4 batches, 2 per call


def test_bad_batch_settings_are_refused_with_the_setting_to_change(tmp_path):
    loader = ScorerLoader(FakeLoader(str(tmp_path / "loads.log")))
    with pytest.raises(EngineError, match=r"images_per_batch, batches_per_call and model_copies must be >= 1, got 0"):
        ImageBatchHandler(loader, images_per_batch=0)
    with pytest.raises(EngineError, match=r"model_copies > 1 needs share_across_processes=True"):
        ImageBatchHandler(loader, model_copies=2)
    with pytest.raises(EngineError, match=r"max_decoders must be >= 1 .*--max_decoders"):
        ScorerLoader(FakeLoader(str(tmp_path / "loads.log")), max_decoders=0)
    handler = ImageBatchHandler(loader, images_per_batch=8, batches_per_call=3, share_across_processes=True,
                                model_copies=2)
    assert dict(handler.batch_elements_kwargs()) == {"min_batch_size": 3, "max_batch_size": 3}
    assert (handler.images_per_batch, handler.share_model_across_processes(), handler.model_copies()) == (8, True, 2)
    assert _loads(tmp_path / "loads.log") == 0


def _load_in_a_fresh_process(loader) -> int:
    """Calls ``loader`` in a process of its own (a worker of another process); the rows of one batch."""
    scorer = loader()
    return len(scorer.score([(_pixels([1, 2]), (), None)])[0].outputs["logits"])


def test_a_preloaded_model_is_taken_by_the_job_in_this_process_which_loads_no_other(tmp_path):
    from transforms.inference import Preload

    log = tmp_path / "loads.log"
    preload = Preload(ScorerLoader(FakeLoader(str(log))))
    handler = ImageBatchHandler(pickle.loads(pickle.dumps(preload.loader)), ("logits",), images_per_batch=4)
    with TestPipeline() as p:  # the DirectRunner's workers run in this process
        assert_that(p | beam.Create([_batch("a", [7, 8])]) | RunInference(handler) | beam.Map(_rows),
                    equal_to([([("/photos/a-7.jpg", 7), ("/photos/a-8.jpg", 8)], {})]))
    assert preload.taken and _loads(log) == 1, "the job loaded a model of its own beside the preloaded one"
    preload.close()
    assert _loads(log, "closed") == 0, "the job's model was closed under it"
    from engines.gpu_memory import loader_key

    assert loader_key(preload.loader) == loader_key(ScorerLoader(FakeLoader(str(log)))), \
        "the preload's token changed the key the memory check's ledger files the model under"


def test_a_worker_in_another_process_loads_its_own_model(tmp_path):
    import concurrent.futures
    import multiprocessing

    from transforms.inference import Preload

    log = tmp_path / "loads.log"
    preload = Preload(ScorerLoader(FakeLoader(str(log))))
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_load_in_a_fresh_process, preload.loader).result(timeout=120) == 2
    assert not preload.taken
    preload.close()
    assert (_loads(log), _loads(log, "closed")) == (2, 1), "the preloaded model, taken by nobody, was not closed"


def test_a_preload_that_failed_gives_its_error_to_the_load_and_a_later_load_tries_again(tmp_path):
    from transforms.inference import Preload

    loader = ScorerLoader(FakeLoader(str(tmp_path / "loads.log"), fail="the model file is corrupt: fix it"))
    preload = Preload(loader)
    with pytest.raises(EngineError, match="the model file is corrupt: fix it"):
        preload.loader()
    assert preload.taken
    with pytest.raises(EngineError, match="the model file is corrupt"):  # a retry loads, and fails on its own
        preload.loader()
    preload.close()
