"""End to end on the DirectRunner: TestPipeline, the CLI, manifests, Parquet and multi-processing.

Every run checks the contract: predictions + dead letters = inputs, each input exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path
import os
import re

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from engines.base import EngineError, UsageError
from pipelines import classify_images
from pipelines.classify_images import make_handler
from pipelines.settings import ClassifyOptions, resolve
from pipelines.partitions import committed_files, committed_rows, committed_stats
from tests.conftest import CAT_CLASSES, ESPRESSO_OR_CUP
from transforms.images import ImageRef, ManifestError, parse_manifest, read_manifest


def _check_outputs(out_dir, good, broken, fmt="jsonl"):
    if fmt == "parquet":
        import pyarrow.parquet as pq

        files = committed_files(out_dir, "predictions")
        assert files and all(f.endswith(".parquet") for f in files), files
        predictions = [row for f in files for row in pq.read_table(f).to_pylist()]
    else:
        predictions = committed_rows(out_dir, "predictions")
    dead = committed_rows(out_dir, "dead_letter")
    predicted = sorted(os.path.basename(r["uri"]) for r in predictions)
    dead_names = sorted(os.path.basename(r["uri"]) for r in dead)
    assert predicted == sorted(os.path.basename(p) for p in good)
    assert dead_names == sorted(broken)
    for row in dead:
        assert re.search(broken[os.path.basename(row["uri"])], row["error"]), row
    by_name = {os.path.basename(r["uri"]): r for r in predictions}
    assert CAT_CLASSES & {p["class_id"] for p in by_name["chelsea.jpg"]["top_k"]}
    assert ESPRESSO_OR_CUP & {p["class_id"] for p in by_name["coffee.jpg"]["top_k"][:3]}
    first = by_name["chelsea.jpg"]["top_k"][0]
    assert set(first) == {"class_id", "label", "score"} and isinstance(first["label"], str)
    return predictions, dead


def test_testpipeline_end_to_end(corpus, model_path):
    directory, good, broken = corpus
    settings, options = resolve(["--input", directory, "--output", "unused", "--batch_size", "4"], start_checks=False)
    handler, labels = make_handler(settings), settings.labels
    assert labels[285] == "Egyptian Mau"  # from the model's own metadata
    with TestPipeline(options=options) as p:
        from transforms.images import DEAD_LETTER, ImageRefs, ReadImageBatches
        from transforms.postprocess import PredictionRows
        from images.pillow_decoder import PreprocessConfig
        from apache_beam.ml.inference.base import RunInference

        found = p | ImageRefs(directory, batch_size=4)
        decoded = found["refs"] | beam.ParDo(ReadImageBatches(PreprocessConfig())).with_outputs(
            DEAD_LETTER, main="batches")
        scored = decoded.batches | RunInference(handler) | beam.ParDo(
            PredictionRows(settings.rows, labels)).with_outputs(DEAD_LETTER, main="blocks")
        rows = scored.blocks | beam.FlatMap(lambda block: block)
        assert_that(rows | "Names" >> beam.Map(lambda r: os.path.basename(r["uri"])),
                    equal_to([os.path.basename(g) for g in good]), label="AllGoodScored")
        assert_that(rows | "Chelsea" >> beam.Filter(lambda r: r["uri"].endswith("chelsea.jpg"))
                    | "IsCat" >> beam.Map(lambda r: bool(CAT_CLASSES & {x["class_id"] for x in r["top_k"]})),
                    equal_to([True]), label="ChelseaIsACat")
        dead = (found[DEAD_LETTER], decoded[DEAD_LETTER], scored[DEAD_LETTER]) | beam.Flatten()
        assert_that(dead | "DeadNames" >> beam.Map(lambda r: os.path.basename(r["uri"])),
                    equal_to(list(broken)), label="AllBrokenDeadLettered")


def test_manifest_columns_reach_every_prediction_and_dead_letter_row(corpus, model_path, tmp_path):
    directory, good, _ = corpus
    manifest = tmp_path / "list.csv"
    manifest.write_text("\n".join([
        "uri,id,sku,shard",
        f"{good[0]},a,S-0,1",
        f"{good[1]},b,S-1",  # a short row: its shard is None
        f"{os.path.join(directory, 'truncated.jpg')},c,S-2,2",
        "gone.jpg,d,S-3,3",  # relative to the manifest's folder, and missing
        "/x/\x00.jpg,e,S-4,4",  # a bad line: no columns can be trusted
    ]) + "\n")
    settings, options = resolve(["--input", str(manifest), "--output", "unused", "--batch_size", "2",
                                 "--keep_columns", "sku,shard"], start_checks=False)
    assert settings.keep_columns == ("sku", "shard") and settings.record()["keep_columns"] == ["sku", "shard"]
    with TestPipeline(options=options) as p:
        from apache_beam.ml.inference.base import RunInference

        from transforms.images import DEAD_LETTER, ImageRefs, ReadImageBatches
        from transforms.postprocess import PredictionRows

        found = p | ImageRefs(settings.input, batch_size=2, keep_columns=settings.keep_columns)
        read = found["refs"] | beam.ParDo(ReadImageBatches(settings.preprocess)).with_outputs(
            DEAD_LETTER, main="batches")
        scored = (read.batches | RunInference(make_handler(settings))
                  | beam.ParDo(PredictionRows(settings.rows, settings.labels)).with_outputs(DEAD_LETTER, main="blocks"))
        rows = scored.blocks | beam.FlatMap(lambda block: block)
        assert_that(rows | "Rows" >> beam.Map(lambda r: (os.path.basename(r["uri"]), list(r)[:-1], r["id"], r["sku"],
                                                         r["shard"], len(r["top_k"]))),
                    equal_to([("chelsea.jpg", ["uri", "id", "sku", "shard", "model"], "a", "S-0", "1", 5),
                              ("coffee.jpg", ["uri", "id", "sku", "shard", "model"], "b", "S-1", None, 5)]),
                    label="Scored")
        dead = (found[DEAD_LETTER], read[DEAD_LETTER], scored[DEAD_LETTER]) | beam.Flatten()
        assert_that(dead | "Dead" >> beam.Map(lambda r: (os.path.basename(r["uri"]), list(r), r["stage"],
                                                         r.get("id"), r["sku"], r["shard"])),
                    equal_to([("truncated.jpg", ["uri", "id", "sku", "shard", "error", "stage"], "decode", "c",
                               "S-2", "2"),
                              ("gone.jpg", ["uri", "id", "sku", "shard", "error", "stage"], "read", "d", "S-3", "3"),
                              ("list.csv:6", ["uri", "sku", "shard", "error", "stage"], "manifest", None, None,
                               None)]), label="DeadLetters")


def test_gpu_decode_failures_carry_the_columns_like_the_predictions_of_their_batch():
    from transforms.images import DEAD_LETTER
    from transforms.inference import ScoredBatch
    from transforms.postprocess import PredictionRows, RowLayout

    refs = (ImageRef("/x/0.jpg", "0", (("sku", "S-0"),)), ImageRef("/x/1.jpg", None, (("sku", None),)))
    topk = PredictionRows(RowLayout(k=2, model="m@1", columns=("sku",)), None)
    topk.setup()
    out = list(topk.process(ScoredBatch(refs, {"logits": np.array([[0.0, 1.0, 2.0]], np.float32)},
                                        {1: "corrupt JPEG"})))
    (dead,) = [o.value for o in out if getattr(o, "tag", None) == DEAD_LETTER]
    (block,) = [o for o in out if isinstance(o, list)]
    assert dead == {"uri": "/x/1.jpg", "sku": None, "error": "corrupt JPEG", "stage": "decode"}
    assert [(list(r), r["sku"]) for r in block] == [(["uri", "id", "sku", "model", "top_k"], "S-0")]


def test_cli_run_writes_the_output_contract(corpus, model_path, tmp_path):
    directory, good, broken = corpus
    out = tmp_path / "out"
    assert classify_images.main(["--input", directory, "--output", str(out), "--batch_size", "5"]) == 0
    _check_outputs(str(out), good, broken)
    stats = committed_stats(str(out))
    assert stats["predictions"] == len(good) and stats["dead_letters"] == len(broken)
    assert stats["inputs"] == len(good) + len(broken) and stats["unaccounted"] == 0
    assert stats["images_per_second"] > 0 and stats["engine"]["engine"] == "onnxruntime"
    assert set(stats["stage_share"]) == {"read", "decode", "inference", "postprocess", "write"}
    assert abs(sum(stats["stage_share"].values()) - 1.0) < 0.01
    assert all(stats["stage_seconds"][s] > 0 for s in ("read", "decode", "inference", "write"))
    lat = stats["batch_latency_seconds"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert stats["batches"] >= 3 and stats["mean_batch_size"] <= 5
    png = [f for f in committed_files(str(out), "stats") if f.endswith(".png")]
    assert Path(png[0]).read_bytes().startswith(b"\x89PNG")
    assert not [p for p in out.rglob(".temp*")]


def test_multi_processing_loses_nothing(corpus, model_path, tmp_path):
    directory, good, broken = corpus
    out = tmp_path / "mp"
    stats = classify_images.run(["--input", directory, "--output", str(out), "--batch_size", "4",
                                 "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    _check_outputs(str(out), good, broken)
    assert stats["predictions"] + stats["dead_letters"] == len(good) + len(broken) == stats["inputs"]


@pytest.mark.parametrize("check", ["--runtime_type_check", "--performance_runtime_type_check"])
def test_beams_runtime_type_checks_pass_with_dead_letters_beside_typed_batches(corpus, model_path, tmp_path, check):
    # Beam checks every output of a ParDo, tagged ones too, against the ParDo's one output hint: the reader's
    # dead letters must not be checked as batches.
    directory, good, broken = corpus
    out = tmp_path / "typed"
    stats = classify_images.run(["--input", directory, "--output", str(out), "--batch_size", "4", check])
    _check_outputs(str(out), good, broken)
    assert stats["predictions"] == len(good) and stats["dead_letters"] == len(broken)


def test_parquet_output(corpus, model_path, tmp_path):
    directory, good, broken = corpus
    out = tmp_path / "pq"
    classify_images.run(["--input", os.path.join(directory, "*.jpg"), "--output", str(out),
                         "--output_format", "parquet", "--top_k", "3"])
    broken_jpg = {k: v for k, v in broken.items() if k.endswith(".jpg")}
    assert len(broken_jpg) < len(broken)  # the glob really filters
    predictions, _ = _check_outputs(str(out), [g for g in good if g.endswith(".jpg")], broken_jpg, "parquet")
    assert all(len(r["top_k"]) == 3 for r in predictions)


def test_manifest_with_ids_and_unusable_lines(corpus, model_path, tmp_path):
    directory, good, _ = corpus
    manifest = tmp_path / "list.jsonl"
    lines = [json.dumps({"uri": good[0], "id": "a1"}), json.dumps({"uri": good[1], "id": 2}),
             json.dumps({"uri": str(tmp_path / "missing.jpg"), "id": "gone"}), "{not json", json.dumps({"id": 3})]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "m"
    stats = classify_images.run(["--input", str(manifest), "--output", str(out)])
    predictions = committed_rows(str(out), "predictions")
    dead = committed_rows(str(out), "dead_letter")
    assert sorted(r["id"] for r in predictions) == ["2", "a1"]
    by_uri = {r["uri"]: r for r in dead}
    missing = by_uri[str(tmp_path / "missing.jpg")]
    assert missing["stage"] == "read" and missing["id"] == "gone" and "cannot read file" in missing["error"]
    assert "not valid JSON" in by_uri[f"{manifest}:4"]["error"]
    assert "no string 'uri'" in by_uri[f"{manifest}:5"]["error"]
    assert stats["predictions"] + stats["dead_letters"] == len(lines) == stats["inputs"]


def test_manifest_parsing_formats():
    assert list(parse_manifest("a.txt", "# header\n/x/1.jpg\n\n gs://b/2.png \n")) == [
        ImageRef("/x/1.jpg"), ImageRef("gs://b/2.png")]
    assert list(parse_manifest("a.csv", "id,uri\n7,/x/1.jpg\n,/x/2.jpg\n")) == [
        ImageRef("/x/1.jpg", "7"), ImageRef("/x/2.jpg", None)]
    with pytest.raises(ManifestError, match=r"no 'uri' column \(its header: 'path'\)"):
        list(parse_manifest("b.csv", "path\n/x/1.jpg\n"))


def test_input_that_matches_nothing_fails_at_start(tmp_path):
    with pytest.raises(UsageError, match="matches no files"):
        classify_images.run(["--input", str(tmp_path / "*.jpg"), "--output", str(tmp_path / "o")])
    assert classify_images.main(["--input", str(tmp_path / "*.jpg"), "--output", str(tmp_path / "o")]) == 2


def test_input_and_output_are_required(tmp_path):
    with pytest.raises(UsageError, match="--input and --output are required"):
        classify_images.run(["--output", str(tmp_path)])


@pytest.mark.parametrize("threads,prefetch,batch,gpu", [(0, 1, 3, False), (1, 1, 1, False), (2, 3, 4, False),
                                                        (4, 8, 2, False), (2, 2, 3, True)])
def test_batched_reading_emits_every_input_once(corpus, threads, prefetch, batch, gpu):
    directory, good, broken = corpus
    from transforms.images import DEAD_LETTER, ImageRef, ReadImageBatches, in_batches
    from images.pillow_decoder import PreprocessConfig
    from images.prescreen import GPU, screen

    refs = [ImageRef(p) for p in good] + [ImageRef(os.path.join(directory, b)) for b in broken]
    refs.append(ImageRef(os.path.join(directory, "missing.jpg"), id="m"))

    def rows(b):
        decoded = [(os.path.basename(r.uri), "pixels") for r in b.refs[:b.decoded_count]]
        assert b.pixels is None or b.pixels.shape[1:] == (224, 224, 3) and b.pixels.dtype == np.uint8
        return decoded + [(os.path.basename(r.uri), "encoded") for r in b.refs[b.decoded_count:]]

    expected = [(os.path.basename(g), "encoded" if gpu and screen(open(g, "rb").read(), 89478485).route == GPU
                 else "pixels") for g in good]
    with TestPipeline() as p:
        # Grouped as listing groups them (in_batches), then read as the pipeline reads them.
        out = (p | beam.Create(list(in_batches(refs, batch)))
               | beam.ParDo(ReadImageBatches(PreprocessConfig(), gpu_decode=gpu, threads=threads,
                                             prefetch=prefetch)).with_outputs(DEAD_LETTER, main="batches"))
        assert_that(out.batches | beam.Map(len) | beam.CombineGlobally(max), equal_to([min(batch, len(good))]),
                    label="BatchSize")
        assert_that(out.batches | beam.FlatMap(rows), equal_to(expected), label="Good")
        assert_that(out[DEAD_LETTER] | beam.Map(lambda r: (os.path.basename(r["uri"]), r["stage"])),
                    equal_to([(b, "read" if b == "moved_away.jpg" else "decode") for b in broken]
                             + [("missing.jpg", "read")]), label="Dead")
    with pytest.raises(ValueError, match="prefetch >= 1"):
        ReadImageBatches(PreprocessConfig(), threads=2, prefetch=0)


def test_one_engine_shared_across_processes(corpus, model_path, tmp_path):
    # Beam's multi-process shared model hands RunInference a proxy that forwards only
    # method calls: the handler must not touch engine properties.
    directory, good, broken = corpus
    out = tmp_path / "shared"
    stats = classify_images.run(["--input", directory, "--output", str(out), "--batch_size", "4",
                                 "--share_model_across_processes"])
    _check_outputs(str(out), good, broken)
    assert stats["predictions"] == len(good)


def test_help_lists_the_pipeline_flags(capsys):
    with pytest.raises(SystemExit):
        classify_images.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--engine", "--engine_path", "--trt_profile", "--top_k", "--output_format",
                 "--runner", "--direct_running_mode", "--direct_num_workers"):
        assert flag in text


def test_csv_manifest_saved_with_a_byte_order_mark(tmp_path):
    # Spreadsheet exports start CSV files with a UTF-8 BOM; the 'uri' column must still be found.
    # The job reads a manifest with exactly these two functions (transforms.images._ReadManifest).
    manifest = tmp_path / "list.csv"
    manifest.write_text("uri,id\n/x/a.jpg,img0\n/x/b.jpg,img1\n", encoding="utf-8-sig")
    assert manifest.read_bytes().startswith(b"\xef\xbb\xbf")
    assert list(parse_manifest(str(manifest), read_manifest(str(manifest)))) == [
        ImageRef("/x/a.jpg", "img0"), ImageRef("/x/b.jpg", "img1")]


def test_failed_batch_becomes_short_dead_letters_through_beams_exception_handling(model_path):
    # Beam emits a failed batch as (batch, (type, repr, traceback lines)); every image in it
    # must end as one dead-letter row whose reason is the error itself, not a traceback.
    from apache_beam.ml.inference.base import RunInference

    from transforms.images import ImageBatch
    from transforms.postprocess import FailedBatchToDeadLetters

    handler = make_handler(resolve(["--input", "unused", "--output", "unused", "--batch_size", "2"],
                                   start_checks=False)[0])
    wrong = [ImageBatch((ImageRef("/x/0.jpg", id="0", columns=(("sku", "S-0"),)),
                         ImageRef("/x/1.jpg", id="1", columns=(("sku", "S-1"),))),
                        np.zeros((2, 200, 200, 3), np.uint8)),
              ImageBatch((ImageRef("/x/2.jpg", id="2", columns=(("sku", None),)),),
                        np.zeros((1, 200, 200, 3), np.uint8))]
    with TestPipeline() as p:
        _, failed = (p | beam.Create(wrong)
                     | RunInference(handler).with_exception_handling())
        rows = failed.failed_inferences | beam.ParDo(FailedBatchToDeadLetters())

        def check(rows):
            assert sorted((r["uri"], r["id"], r["sku"], r["stage"]) for r in rows) == [
                ("/x/0.jpg", "0", "S-0", "inference"), ("/x/1.jpg", "1", "S-1", "inference"),
                ("/x/2.jpg", "2", None, "inference")]
            for r in rows:
                assert r["error"].startswith("inference failed for the batch holding this image ("), r
                assert "Traceback" not in r["error"] and len(r["error"]) < 700, r
                assert "200" in r["error"] and "224" in r["error"], r  # the shape problem, named

        assert_that(rows, check)


def test_describe_failure_handles_exceptions_and_beams_tuples():
    from transforms.postprocess import describe_failure

    try:
        raise EngineError("bad shape [2, 200, 200, 3]")
    except EngineError as e:
        import sys
        import traceback

        tup = (type(e), repr(e), traceback.format_exception(*sys.exc_info()))
        assert describe_failure(e) == describe_failure(tup) == "EngineError: bad shape [2, 200, 200, 3]"
    assert describe_failure(ValueError("x" * 5000)).endswith("...")
    assert len(describe_failure(ValueError("x" * 5000))) == 600


@pytest.mark.parametrize("flags,message", [
    (["--resize", "100"], r"bad preprocessing flags: .*resize"),
    (["--crop", "200"], r"--crop 200 does not fit the model: it takes 224 x 224 images \(height x width; height 200 is not "
                          r"224, width 200 is not 224\); pass --crop 224"),
    (["--crop", "2x"], r"--crop takes a size such as 224 \(square\) or 240x320 \(height x width\), got '2x'"),
    (["--output_mode", "raw", "--threshold", "0.5"], r"--threshold picks classes with --output_mode topk"),
    (["--output_name", "logits", "--output_name", "x"], r"--output_mode topk ranks one output"),
    (["--activation", "sigmoid", "--output_mode", "raw"], r"--output_mode raw writes the outputs as the model gives"),
    (["--threshold", "2"], r"--threshold must be <= 1, got 2"),
    (["--output_name", "probs"], r"--output_name 'probs' is not an output of .*\['logits'\]"),
    (["--max_pixels", "0"], r"--max_pixels must be >= 1, got 0 \(accepted: 1 to "),
])
def test_setup_mistakes_fail_at_start_naming_the_flag(corpus, model_path, tmp_path, flags, message):
    directory, _, _ = corpus
    with pytest.raises(UsageError, match=message):
        classify_images.run(["--input", directory, "--output", str(tmp_path / "o"), *flags])
    assert classify_images.main(["--input", directory, "--output", str(tmp_path / "o"), *flags]) == 2
    assert not (tmp_path / "o").exists()  # nothing ran


def test_many_core_local_defaults_two_bundle_threads_two_sessions_lose_nothing(corpus, model_path, tmp_path,
                                                                                 monkeypatch):
    # What a 16-core machine gets by default: multi_threading x2, two ONNX Runtime sessions.
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    directory, good, broken = corpus
    out = tmp_path / "mt"
    stats = classify_images.run(["--input", directory, "--output", str(out), "--batch_size", "4"])
    _check_outputs(str(out), good, broken)
    settings = stats["settings"]
    assert settings["direct_running_mode"] == "multi_threading" and settings["direct_num_workers"] == 2
    assert settings["local_defaults"].startswith("16 cores: --direct_running_mode=multi_threading")
    assert stats["engine"]["ort_sessions"] == 2 and stats["engine"]["intra_op_threads"] == 8
    assert stats["inputs"] == len(good) + len(broken) and stats["unaccounted"] == 0


def test_local_defaults_step_aside_for_explicit_flags_and_other_runners(monkeypatch):
    from pipelines.settings import is_local, local_defaults

    monkeypatch.setattr(os, "cpu_count", lambda: 16)

    def applied(*flags):
        options = ClassifyOptions(["--input", "x", "--output", "y", *flags])
        chosen = local_defaults(options, list(flags), is_local(options))
        assert options.ort_sessions == 1  # nothing is written into the parsed options
        return chosen

    values, note = applied()
    assert values == {"ort_sessions": 2, "intra_op_threads": 8, "direct_running_mode": "multi_threading",
                      "direct_num_workers": 2}
    assert note == ("16 cores: --direct_running_mode=multi_threading --direct_num_workers=2 --ort_sessions 2 "
                    "--intra_op_threads 8 (pass any of them to choose yourself)")
    for flags in (["--direct_running_mode=in_memory"], ["--direct_num_workers", "1"], ["--intra_op_threads=4"],
                  ["--ort_sessions=1"], ["--providers", "cuda"], ["--runner", "DataflowRunner"],
                  ["--engine", "tensorrt"]):
        assert applied(*flags) == ({}, None), flags
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert applied() == ({}, None)  # small machines: one bundle thread measured as fast
