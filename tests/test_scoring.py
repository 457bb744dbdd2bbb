"""One ImageScorer shared by several threads, as Beam's RunInference shares one loaded model between a
worker's bundle threads (DirectRunner ``multi_threading``, Dataflow's harness threads, the threads of
Beam's multi-process shared model): every call must get its own images' predictions. The real DALI
graph on the CPU (``--decode dali_cpu``) and the real model, compared with a one-thread run.
"""

from __future__ import annotations

import io
import os
import threading
import time
from typing import Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from images.pillow_decoder import PreprocessConfig, crop_box, preprocess_image
from images.prescreen import screen
from pipelines.partitions import committed_rows
from tests.conftest import CAT_CLASSES, jpeg_bytes, photo

dali = pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")

THREADS = 4
ROUNDS = 2  # score() calls per thread
ITEMS_PER_CALL = 2  # batches per call: RunInference hands a call several, decoded ahead of the engine
IMAGES_PER_ITEM = 4
#: Seconds the threads of one concurrent run get; one thread alone needs about 5 on two busy cores.
HANG_S = 90
#: Not an image: DALI fails the batch holding it, which the decoder then retries image by image.
BROKEN = b"\xff\xd8\xff this is no JPEG"
_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel")


def distinct_jpegs(count: int, seed: int = 0) -> List[bytes]:
    """``count`` different JPEGs from skimage's colour photos, each rotated, mirrored, cropped and scaled
    its own way, so that a prediction given to the wrong image shows in its logits."""
    sources = [photo(name) for name in _SOURCES]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        src = np.rot90(sources[i % len(sources)], k=(i // len(sources)) % 4)
        if (i // (4 * len(sources))) % 2:
            src = src[:, ::-1]
        h, w = src.shape[:2]
        ch, cw = int(rng.integers(h * 3 // 5, h + 1)), int(rng.integers(w * 3 // 5, w + 1))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image = Image.fromarray(np.ascontiguousarray(src[y:y + ch, x:x + cw]))
        scale = float(rng.uniform(240, 330)) / min(ch, cw)  # small files: decoding stays cheap
        image = image.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=int(rng.integers(80, 96)))
        out.append(buf.getvalue())
    return out


def _item(files: List[bytes], config: PreprocessConfig = PreprocessConfig()):
    """One batch as the reader hands it to the scorer: encoded files and each one's crop box."""
    boxes = []
    for data in files:
        s = screen(data, config.max_pixels)
        boxes.append(crop_box(s.width, s.height, config) if s.width else (0.0, 0.0, 16.0, 16.0))
    return (None, tuple(files), boxes)


@pytest.fixture(scope="module")
def calls() -> List[List[tuple]]:
    """THREADS x ROUNDS score() calls of ITEMS_PER_CALL batches, no photo in two of them; the first
    round's second batch of each thread holds a broken file."""
    photos = iter(distinct_jpegs(THREADS * ROUNDS * ITEMS_PER_CALL * IMAGES_PER_ITEM))
    out = []
    for t in range(THREADS):
        for r in range(ROUNDS):
            items = []
            for i in range(ITEMS_PER_CALL):
                files = [next(photos) for _ in range(IMAGES_PER_ITEM)]
                if r == 0 and i == 1:
                    files.insert(2, BROKEN)
                items.append(_item(files))
            out.append(items)
    return out


def _scorer(model_path, **loader):
    from images.dali_decoder import DaliDecoderOptions
    from engines.onnxruntime_engine import OnnxRuntimeLoader
    from transforms.inference import ScorerLoader

    decoder = DaliDecoderOptions(device="cpu", max_batch=IMAGES_PER_ITEM + 1, threads=1)
    return ScorerLoader(OnnxRuntimeLoader(model_path), decoder, PreprocessConfig(), **loader)()


@pytest.fixture(scope="module")
def expected(calls, model_path):
    """What one thread gets, call after call, from a scorer of its own."""
    scorer = _scorer(model_path)
    try:
        return [scorer.score(items, ["logits"]) for items in calls]
    finally:
        scorer.close()


def _score_concurrently(scorer, calls) -> Tuple[Dict[int, list], Dict[int, str]]:
    """Runs the calls on THREADS threads at once (thread t takes calls t*ROUNDS ...), all on ``scorer``.

    Returns:
        (call index -> results, call index -> the error it raised).
    """
    results, errors = {}, {}
    start = threading.Barrier(THREADS)

    def work(t):
        start.wait()
        for k in range(t * ROUNDS, (t + 1) * ROUNDS):
            try:
                results[k] = scorer.score(calls[k], ["logits"])
            except Exception as e:  # a mixed-up decoder raises: counted as a wrong call below
                errors[k] = f"{type(e).__name__}: {e}"

    # Daemon threads with one deadline: a decoder mixed up between callers can wait forever for a
    # batch another caller took, and the test must then fail rather than hang.
    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + HANG_S
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = sum(thread.is_alive() for thread in threads)
    assert not hung, f"{hung} of {THREADS} scoring threads still waited for a decoded batch after {HANG_S} s"
    return results, errors


def _check_same_as_one_thread(results, errors, expected):
    wrong, failed_differs = [], []
    for k, want in enumerate(expected):
        if k in errors:
            continue
        for i, (got, exp) in enumerate(zip(results[k], want)):
            if sorted(got.failed) != sorted(exp.failed):
                failed_differs.append((k, i, sorted(got.failed), sorted(exp.failed)))
                continue
            a, b = got.outputs["logits"], exp.outputs["logits"]
            if a.shape != b.shape:
                wrong.append((k, i, f"{a.shape[0]} rows instead of {b.shape[0]}"))
                continue
            for row in range(b.shape[0]):
                if a[row].argmax() != b[row].argmax() or not np.allclose(a[row], b[row], atol=1e-4, rtol=0):
                    wrong.append((k, i, row))
    assert not errors and not wrong and not failed_differs, (
        f"{len(errors)} of {len(expected)} calls raised ({list(errors.values())[:2]}); {len(wrong)} images got "
        f"another image's logits or top-1 (call, batch, row): {wrong[:6]}; {len(failed_differs)} batches failed "
        f"other images than one thread did: {failed_differs[:3]}")


@pytest.mark.parametrize("decoders", [1, 2])
def test_four_threads_sharing_one_scorer_each_get_their_own_images_predictions(calls, expected, model_path, decoders):
    # The reference itself is sound: the photos differ, the broken file is the only failure.
    assert all(sorted(r.failed) == ([2] if k % ROUNDS == 0 and i == 1 else [])
               for k, want in enumerate(expected) for i, r in enumerate(want))
    assert all(r.outputs["logits"].shape == (IMAGES_PER_ITEM, 1000) for want in expected for r in want)
    tops = np.concatenate([r.outputs["logits"].argmax(1) for want in expected for r in want])
    assert len(set(tops.tolist())) > 8, "the photos are too alike to show a mix-up"
    # Every caller's batches share the decoders' queues: the shape in which rows could be mixed up.
    scorer = _scorer(model_path, max_decoders=decoders)
    try:
        assert len(scorer.decoders.services) == decoders
        results, errors = _score_concurrently(scorer, calls)
    finally:
        scorer.close()
    _check_same_as_one_thread(results, errors, expected)


def test_a_caller_decodes_while_another_callers_engine_call_runs(calls, model_path):
    """One decoder (the default) serves a second caller while the first is inside its engine call.

    Before, a call borrowed the decoder for its decode *and* its inference, so with one decoder the
    callers took turns at both and the GPU never decoded during an engine call."""
    scorer = _scorer(model_path)
    engine = scorer.engine
    inside, leave = threading.Event(), threading.Event()
    real_infer = engine.infer

    def slow_infer(feed, outputs=None):  # the first caller's engine call holds until the second has decoded
        if threading.current_thread().name == "first":
            inside.set()
            if not leave.wait(HANG_S):
                raise RuntimeError("the second caller never got its batch decoded")
        return real_infer(feed, outputs)

    engine.infer = slow_infer
    results, errors = {}, {}

    def call(name, items):
        try:
            results[name] = scorer.score(items, ["logits"])
        except Exception as e:
            errors[name] = e

    try:
        first = threading.Thread(target=call, args=("first", calls[0][:1]), name="first", daemon=True)
        first.start()
        assert inside.wait(HANG_S)
        second = threading.Thread(target=call, args=("second", calls[2][:1]), name="second", daemon=True)
        second.start()
        second.join(HANG_S / 3)  # decoded and scored while "first" is still inside its engine call
        finished_while_first_waited = not second.is_alive()
        leave.set()
        first.join(HANG_S)
        second.join(HANG_S)
    finally:
        leave.set()
        scorer.close()
    assert finished_while_first_waited, "the second caller waited for the first caller's engine call"
    assert not errors and [r[0].outputs["logits"].shape for r in results.values()] == [(4, 1000)] * 2


def test_batches_started_ahead_by_reader_threads_beside_callers_get_their_own_predictions(calls, expected,
                                                                                         model_path):
    """As a job scores ahead (``transforms.ahead``): two reader threads start every batch of their calls on the
    scorer at once (``score_ahead``), while two bundle threads call :meth:`score` on the same scorer; every
    batch must get its own images' logits and failures, as one thread gets them."""
    scorer = _scorer(model_path)
    started: Dict[int, list] = {}
    results, errors = {}, {}
    begin = threading.Barrier(THREADS)

    def reader(t):
        begin.wait()
        for k in range(t * ROUNDS, (t + 1) * ROUNDS):
            started[k] = [scorer.score_ahead(item, ["logits"]) for item in calls[k]]

    def caller(t):
        begin.wait()
        for k in range(t * ROUNDS, (t + 1) * ROUNDS):
            try:
                results[k] = scorer.score(calls[k], ["logits"])
            except Exception as e:
                errors[k] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=reader if t % 2 else caller, args=(t,), daemon=True) for t in range(THREADS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG_S)
        assert not any(thread.is_alive() for thread in threads), "a thread still waited after the deadline"
        for k, futures in started.items():
            try:
                results[k] = [f.result(timeout=HANG_S) for f in futures]
            except Exception as e:
                errors[k] = f"{type(e).__name__}: {e}"
    finally:
        scorer.close()
    assert sorted(started) == [k for t in range(1, THREADS, 2) for k in range(t * ROUNDS, (t + 1) * ROUNDS)]
    _check_same_as_one_thread(results, errors, expected)


def test_closing_a_scorer_drops_the_batches_started_ahead_that_have_not_begun(calls, model_path):
    scorer = _scorer(model_path)
    futures = [scorer.score_ahead(item, ["logits"]) for items in calls for item in items]
    start = time.monotonic()
    scorer.close()
    assert time.monotonic() - start < HANG_S / 3
    assert all(f.done() for f in futures)
    finished = [f for f in futures if not f.cancelled()]
    assert all(f.exception() is None for f in finished)  # the one being scored at close finished first
    assert len(finished) < len(futures)
    from engines.base import EngineError
    with pytest.raises(EngineError, match="closed"):
        scorer.score_ahead(calls[0][0], ["logits"])


def test_max_decoders_reaches_the_recipe_and_below_one_is_refused(tmp_path, model_path):
    from engines.base import UsageError
    from pipelines.classify_images import make_handler, run
    from pipelines.settings import resolve

    settings, _ = resolve(["--input", "x", "--output", "y", "--max_decoders", "2", "--decode", "dali_cpu"],
                          start_checks=False)
    assert make_handler(settings).loader.max_decoders == 2
    with pytest.raises(UsageError, match="--max_decoders must be >= 1"):
        run(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--max_decoders", "0"])


@pytest.mark.parametrize("decode", ["dali_cpu", "cpu"])
def test_a_240_by_320_model_is_fed_240_by_320_crops_by_either_decoder(tmp_path, decode):
    """A user's model taking 240 x 320 (height x width), fed by the DALI graph or, without a decoder,
    by the Pillow fallback: the rows are those of Pillow's crops fed to the engine directly, and a
    batch holding only a broken file gives no rows and its reason."""
    from engines.model_adapter import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, wrap
    from engines.onnxruntime_engine import OnnxRuntimeLoader
    from images.dali_decoder import DaliDecoderOptions
    from tests import model_variants
    from transforms.inference import ScorerLoader

    model = wrap(model_variants.resized(model_variants.load_float_model(), 240, 320),
                 Preprocessing(IMAGENET_MEAN, IMAGENET_STD))
    path = tmp_path / "wide.onnx"
    path.write_bytes(model.SerializeToString())
    config = PreprocessConfig(resize=320, crop=240, crop_width=320)
    decoder = (DaliDecoderOptions(resize=320, crop=240, crop_width=320, device="cpu", max_batch=8, threads=1)
               if decode == "dali_cpu" else None)
    files = [jpeg_bytes(photo(name)) for name in ("chelsea", "coffee", "rocket")]
    files.append(jpeg_bytes(photo("astronaut")[:, 100:400]))  # portrait
    scorer = ScorerLoader(OnnxRuntimeLoader(str(path)), decoder, config)()
    try:
        photos, broken = scorer.score([_item(files + [BROKEN], config), _item([BROKEN], config)], ["logits"])
        pixels = np.stack([preprocess_image(data, config) for data in files])
        assert pixels.shape == (4, 240, 320, 3)
        direct = scorer.engine.infer({scorer.engine.input_names()[0]: pixels}, ["logits"])["logits"]
    finally:
        scorer.close()
    assert list(photos.failed) == [4] and list(broken.failed) == [0] and broken.outputs == {}
    got = photos.outputs["logits"]
    assert got.shape == (4, 1000) and got.argmax(1).tolist() == direct.argmax(1).tolist()
    if decode == "cpu":  # the same pixels; DALI's differ by under one level on average (test_gpu_decode_path)
        np.testing.assert_allclose(got, direct, atol=1e-4, rtol=0)
    assert direct.argmax(1)[0] in CAT_CLASSES


def _rows(output: str) -> Tuple[Dict[str, Tuple[int, float]], List[dict]]:
    """uri -> (top-1 class, its score), and the dead-letter rows, of a committed run in ``output``.

    Read as a user must: through the files the committed ``_SUCCESS`` lists (it raises when there is none).
    """
    predictions = committed_rows(output, "predictions")
    top1 = {row["uri"]: (row["top_k"][0]["class_id"], row["top_k"][0]["score"]) for row in predictions}
    assert len(top1) == len(predictions), "an image has two prediction rows"
    assert top1, f"no prediction rows in {output}"
    return top1, committed_rows(output, "dead_letter")


def test_the_cli_with_four_bundle_threads_gives_the_rows_of_one(tmp_path, model_path):
    """The whole job, as measured on a GPU where 58% of rows carried another image's top-1: four bundle
    threads share the one loaded scorer (``multi_threading``); each image must keep its own row."""
    from pipelines.classify_images import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, data in enumerate(distinct_jpegs(96, seed=1)):
        (photos / f"photo_{i:03d}.jpg").write_bytes(data)
    runs, ahead = {}, {}
    # The reference scores each batch when RunInference reaches it (--no_score_ahead); the others as the job
    # does by default, each batch started on the scorer by the reader thread that read it (transforms.ahead).
    for workers, flags in ((1, ["--no_score_ahead"]), (4, []), (1, [])):
        out = str(tmp_path / f"workers{workers}{''.join(flags)}")
        assert main(["--input", str(photos), "--output", out, "--decode", "dali_cpu", "--batch_size", "16",
                     "--direct_running_mode", "multi_threading", "--direct_num_workers", str(workers),
                     "--dali_threads", "1", "--decode_threads", "2", "--progress_every_s", "0", *flags]) == 0
        runs[workers, bool(flags)] = _rows(out)
        stats = _stats(out)
        ahead[workers, bool(flags)] = stats["batches_scored_ahead"]
        # In one process every batch started ahead is taken, none scored twice.
        assert stats["batches_started_ahead"] == stats["batches_scored_ahead"], stats
    one, one_dead = runs[1, True]
    assert one_dead == [] and len(one) == 96
    assert ahead[1, True] == 0 and ahead[4, False] > 0 and ahead[1, False] > 0, ahead
    for key in ((4, False), (1, False)):
        rows, dead = runs[key]
        assert dead == [] and set(rows) == set(one)
        moved = sorted(uri for uri in one if rows[uri][0] != one[uri][0] or abs(rows[uri][1] - one[uri][1]) > 1e-5)
        assert not moved, (f"{len(moved)} of {len(one)} images got another top-1 or score with {key[0]} thread(s) "
                           f"scoring ahead: {moved[:5]}")


def _stats(output: str) -> dict:
    import json

    from transforms.commit import parse_record

    record = parse_record(open(os.path.join(output, "_SUCCESS"), "rb").read())
    return json.load(open(os.path.join(output, record["run_folder"], "stats.json")))
