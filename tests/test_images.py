"""transforms/images.py: a manifest's own columns (``sku``, ``shard``, ``label_gt``, ...) travel with each
input, so that every prediction and dead-letter row can be joined back to the user's records.

The rows themselves are checked through the pipeline in tests/test_pipeline.py (TestPipeline and the CLI);
here: which columns a manifest has, which a run keeps (``--keep_columns``), and their values.
"""

from __future__ import annotations

import pickle

import pytest

from transforms.images import (RESERVED_COLUMNS, ImageRef, ManifestError, dead_letter, manifest_columns,
                               parse_manifest, ref_dead_letter, ref_fields, resolve_keep_columns)


def _entries(name, text, keep):
    """The manifest's entries: refs as they are, dead letters as their rows."""
    return [entry if isinstance(entry, ImageRef) else entry.value for entry in parse_manifest(name, text, keep)]


def test_csv_columns_are_kept_in_the_keep_order_exactly_as_the_csv_module_reads_them():
    text = "uri, id , sku ,label_gt,shard\n/x/1.jpg,7, A-1 ,cat,\n/x/2.jpg,8\n"
    assert _entries("m.csv", text, ("sku", "label_gt", "shard")) == [
        ImageRef("/x/1.jpg", "7", (("sku", " A-1 "), ("label_gt", "cat"), ("shard", ""))),
        ImageRef("/x/2.jpg", "8", (("sku", None), ("label_gt", None), ("shard", None)))]  # a short row
    assert _entries("m.csv", text, ("shard", "sku")) == [
        ImageRef("/x/1.jpg", "7", (("shard", ""), ("sku", " A-1 "))), ImageRef("/x/2.jpg", "8", (("shard", None),
                                                                                                ("sku", None)))]
    # Without a keep list (callers from before columns existed) or with an empty one, refs carry none.
    assert _entries("m.csv", text, None) == _entries("m.csv", text, ()) == [ImageRef("/x/1.jpg", "7"),
                                                                           ImageRef("/x/2.jpg", "8")]
    assert ImageRef("/x/1.jpg", "7").columns is None


def test_jsonl_columns_strings_as_they_are_other_values_as_json_missing_and_null_as_none():
    lines = ['{"uri": "/x/1.jpg", "sku": "A\\u00e9", "n": 3, "ok": true, "meta": {"\\u00e9": [1, 2.5]}, '
             '"none": null}',
             '{"uri": "/x/2.jpg", "id": 4}']
    keep = ("sku", "n", "ok", "meta", "none")
    assert _entries("m.jsonl", "\n".join(lines), keep) == [
        ImageRef("/x/1.jpg", None, (("sku", "Aé"), ("n", "3"), ("ok", "true"), ("meta", '{"é": [1, 2.5]}'),
                                    ("none", None))),
        ImageRef("/x/2.jpg", "4", tuple((name, None) for name in keep))]


@pytest.mark.parametrize("name,text,line", [
    ("m.csv", "uri,sku\n/x/1.jpg,a\n/x/\x00.jpg,b\n", 3),
    ("m.jsonl", '{"uri": "/x/1.jpg", "sku": "a"}\n{not json\n', 2),
    ("m.jsonl", '{"uri": "/x/1.jpg", "sku": "a"}\n{"uri": "/x/2.jpg", "sku": "\\ud800"}\n', 2),
])
def test_a_bad_line_carries_every_kept_column_as_none_so_every_row_has_the_same_keys(name, text, line):
    good, bad = _entries(name, text, ("sku", "shard"))
    assert good == ImageRef("/x/1.jpg", None, (("sku", "a"), ("shard", None)))
    assert list(bad) == ["uri", "sku", "shard", "error", "stage"]
    assert (bad["uri"], bad["sku"], bad["shard"], bad["stage"]) == (f"{name}:{line}", None, None, "manifest")


def test_a_missing_relative_file_is_a_read_dead_letter_with_its_columns(tmp_path):
    manifest = tmp_path / "m.csv"
    (row,) = _entries(str(manifest), "uri,id,sku\ngone.jpg,9,A-1\n", ("sku",))
    assert (row["uri"], row["id"], row["sku"], row["stage"]) == (str(tmp_path / "gone.jpg"), "9", "A-1", "read")
    assert list(row) == ["uri", "id", "sku", "error", "stage"]


def test_rows_are_built_from_the_ref_uri_id_then_its_columns():
    ref = ImageRef("/x/1.jpg", "7", (("b", "1"), ("a", None)))
    assert list(ref_fields(ref).items()) == [("uri", "/x/1.jpg"), ("id", "7"), ("b", "1"), ("a", None)]
    assert ref_fields(ImageRef("/x/1.jpg")) == {"uri": "/x/1.jpg"}  # no id: no key, as before columns
    assert ref_dead_letter(ref, "empty file", "decode").value == {
        "uri": "/x/1.jpg", "id": "7", "b": "1", "a": None, "error": "empty file", "stage": "decode"}
    assert dead_letter("/x/2.jpg", "gone", "read").value == {"uri": "/x/2.jpg", "error": "gone", "stage": "read"}


def test_a_ref_with_columns_is_hashable_picklable_and_survives_beams_coder():
    from apache_beam import coders

    ref = ImageRef("gs://b/1.jpg", "7", (("sku", "A-1"), ("shard", None)))
    assert hash(ref) == hash(ImageRef("gs://b/1.jpg", "7", (("sku", "A-1"), ("shard", None))))
    assert pickle.loads(pickle.dumps(ref)) == ref
    coder = coders.registry.get_coder(ImageRef)
    assert coder.decode(coder.encode(ref)) == ref
    batch = [ref, ImageRef("gs://b/2.jpg")]  # refs travel in lists, one element per batch
    assert coders.FastPrimitivesCoder().decode(coders.FastPrimitivesCoder().encode(batch)) == batch


def test_manifest_columns_in_order_other_than_uri_and_id(tmp_path):
    assert manifest_columns("m.csv", "sku, uri ,label_gt,id , shard\n/x/1.jpg,a,b,c,d\n") == (
        "sku", "label_gt", "shard")  # names stripped, as matching 'uri' and 'id' does
    lines = ['{"uri": "/x/1.jpg", "b": 1, "a": 2}', "{not json", '{"id": 3, "skipped": 1}', "[1]",
             '{"uri": "/x/2.jpg", "id": 2, "c": null, "a": 5}']
    assert manifest_columns("m.jsonl", "\n".join(lines)) == ("b", "a", "c")  # first seen over all good lines
    assert manifest_columns("m.txt", "/x/1.jpg\n") == ()
    (tmp_path / "m.csv").write_text("uri,sku\n/x/1.jpg,a\n")
    assert manifest_columns(str(tmp_path / "m.csv")) == ("sku",)  # read from the file when no text is given
    assert manifest_columns(str(tmp_path)) == manifest_columns(str(tmp_path / "*.jpg")) == ()  # not manifests


def test_keep_columns_default_all_empty_none_or_exactly_those_named(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,id,sku,shard,label_gt\n/x/1.jpg,1,a,b,c\n")
    path = str(manifest)
    assert resolve_keep_columns(path, None) == ("sku", "shard", "label_gt")
    assert resolve_keep_columns(path, "") == ()
    assert resolve_keep_columns(path, "label_gt, sku") == ("label_gt", "sku")


def test_keep_columns_naming_a_column_the_manifest_lacks_lists_those_it_has(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"uri": "/x/1.jpg", "sku": "a", "shard": 1}\n')
    with pytest.raises(ManifestError, match=r"--keep_columns sku,nope,gone: manifest .*m\.jsonl has no column 'nope', "
                                            r"'gone'; its columns \(besides uri and id\): sku, shard"):
        resolve_keep_columns(str(manifest), "sku,nope,gone")


@pytest.mark.parametrize("name", ["photos/*.jpg", "photos/", "list.txt"])
def test_keep_columns_needs_a_csv_or_jsonl_manifest(tmp_path, name):
    (tmp_path / "photos").mkdir()
    (tmp_path / "list.txt").write_text("/x/1.jpg\n")
    path = str(tmp_path / name)
    assert resolve_keep_columns(path, None) == resolve_keep_columns(path, "") == ()
    with pytest.raises(ManifestError, match=r"--keep_columns sku needs a \.csv or \.jsonl manifest as --input"):
        resolve_keep_columns(path, "sku")


def test_a_column_named_like_a_field_the_job_writes_is_refused_with_the_fix(tmp_path):
    assert {"uri", "id", "top_k", "classes", "error", "stage", "model"} == set(RESERVED_COLUMNS)
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,sku,Stage,shard\n/x/1.jpg,a,b,c\n")
    path = str(manifest)
    message = (r"manifest .*m\.csv: its column 'Stage' has the name of a field the job writes \(.*stage.*\); "
               r"rename it in the manifest, or leave it out with --keep_columns \(e\.g\. --keep_columns sku,shard\)")
    with pytest.raises(ManifestError, match=message):
        resolve_keep_columns(path, None)  # by default every column is kept, so it would be written
    with pytest.raises(ManifestError, match=message):
        resolve_keep_columns(path, "Stage")
    assert resolve_keep_columns(path, "sku,shard") == ("sku", "shard")
    # Callers add the fields their rows gain (the BigQuery run columns, output tensors).
    with pytest.raises(ManifestError, match=r"its column 'shard' has the name of a field the job writes"):
        resolve_keep_columns(path, "sku,shard", reserved=("shard",))


@pytest.mark.parametrize("header,message", [
    ("uri,sku,,shard", r"column 3 of its header has no name; name it in the manifest, or leave it out with "
                       r"--keep_columns \(e\.g\. --keep_columns sku,shard\)"),
    ("uri,sku,shard,SKU", r"has the columns 'sku' and 'SKU', one name when case is ignored \(as BigQuery "
                          r"does\); rename one in the manifest, or leave them out with --keep_columns "
                          r"\(e\.g\. --keep_columns shard\)"),
    ("uri,sku,shard,sku", r"names the column 'sku' twice; rename one in the manifest, or leave them out with "
                          r"--keep_columns \(e\.g\. --keep_columns shard\)"),
])
def test_a_column_without_a_name_or_named_twice_is_refused_unless_left_out(tmp_path, header, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"{header}\n/x/1.jpg,a,b,c\n")
    with pytest.raises(ManifestError, match=message):
        resolve_keep_columns(str(manifest), None)
    assert resolve_keep_columns(str(manifest), "shard") == ("shard",)


@pytest.mark.parametrize("flag,message", [("sku,,shard", r"--keep_columns 'sku,,shard' holds an empty name"),
                                          ("sku,shard,sku", r"--keep_columns names 'sku' twice")])
def test_a_keep_columns_value_with_an_empty_or_repeated_name_is_refused(tmp_path, flag, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,sku,shard\n/x/1.jpg,a,b\n")
    with pytest.raises(ManifestError, match=message):
        resolve_keep_columns(str(manifest), flag)


def test_an_empty_json_key_or_keeping_uri_or_id_is_refused(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"uri": "/x/1.jpg", "": 1, "sku": "a"}\n')
    with pytest.raises(ManifestError, match=r'its lines have a key with an empty name \(""\); name it in the manifest, '
                                            r"or leave it out with --keep_columns \(e\.g\. --keep_columns sku\)"):
        resolve_keep_columns(str(manifest), None)
    with pytest.raises(ManifestError, match=r"--keep_columns names 'id', which every row carries already; leave it "
                                            r"out"):
        resolve_keep_columns(str(manifest), "sku,id")
    assert resolve_keep_columns(str(manifest), "sku") == ("sku",)


def test_a_batch_is_sized_from_its_bytes_without_a_pickle_and_still_pickles_whole(monkeypatch):
    # Beam samples element sizes by encoding them with the PCollection's coder: with pickle that copied a
    # batch's ~11 MB of files on the bundle thread for each sample.
    import numpy as np
    from apache_beam.coders import registry

    from transforms.images import ImageBatch, ImageBatchCoder

    batch = ImageBatch((ImageRef("a.jpg"), ImageRef("b.jpg", "7")), pixels=np.ones((1, 4, 4, 3), np.uint8),
                       encoded=(b"x" * 1000,), boxes=((0.0, 0.0, 4.0, 4.0),))
    batch.scoring = object()  # this process's scoring: not pickled
    coder = registry.get_coder(ImageBatch)
    assert isinstance(coder, ImageBatchCoder)
    impl = coder.get_impl()
    real = pickle.dumps
    monkeypatch.setattr(pickle, "dumps", lambda *a, **k: pytest.fail("pickled to size a batch"))
    assert impl.get_estimated_size_and_observables(batch) == (48 + 1000, [])
    monkeypatch.setattr(pickle, "dumps", real)
    back = impl.decode(impl.encode(batch))
    assert back.refs == batch.refs and back.encoded == batch.encoded and back.boxes == batch.boxes
    assert np.array_equal(back.pixels, batch.pixels) and back.scoring is None
    assert impl.estimate_size({"uri": "not a batch"}) == len(real({"uri": "not a batch"}, pickle.HIGHEST_PROTOCOL))


def test_the_jobs_read_batches_travel_with_the_batch_coder(tmp_path):
    import apache_beam as beam
    from apache_beam.coders import registry

    from pipelines.classify_images import build_pipeline
    from pipelines.settings import resolve
    from transforms.images import ImageBatchCoder

    (tmp_path / "in").mkdir()
    settings, options = resolve(["--input", str(tmp_path / "in") + "/*.jpg", "--output", str(tmp_path / "out")],
                                start_checks=False)
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, settings)
    read = [t for t in pipeline.transforms_stack[0].parts if t.full_label == "ReadBatches"]
    assert len(read) == 1
    types = {str(tag): pcoll.element_type for tag, pcoll in read[0].outputs.items()}
    assert isinstance(registry.get_coder(types["None"]), ImageBatchCoder), types  # the main output
    assert not any(isinstance(registry.get_coder(t), ImageBatchCoder) for tag, t in types.items() if tag != "None")


# The GPU decoder's local files: read together on DALI's threads, each with its own outcome.

def _read_batches(reader, batches):
    """Runs the reader's bundle as Beam would, on one thread: (batches, dead-letter rows)."""
    from tests.conftest import run_bundle
    from transforms.images import ImageBatch

    out = run_bundle(reader, batches)
    return [o for o in out if isinstance(o, ImageBatch)], [o.value for o in out if not isinstance(o, ImageBatch)]


@pytest.fixture
def recorded_reads(monkeypatch):
    """The paths of every call of the real DALI reader that ``ReadImageBatches`` makes."""
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")
    import transforms.images as images
    from images.dali_file_reader import DaliFileReader

    calls = []

    class Recording(DaliFileReader):
        def read(self, paths):
            calls.append(list(paths))
            return super().read(paths)

    monkeypatch.setattr(images, "DaliFileReader", Recording)
    return calls


def test_local_files_for_the_gpu_decoder_are_read_together_each_with_its_own_outcome(corpus, tmp_path,
                                                                                   recorded_reads):
    import os

    from images.pillow_decoder import PreprocessConfig
    from images.reading import load_image
    from transforms.images import ReadImageBatches

    directory, good, broken = corpus
    os.mkfifo(tmp_path / "pipe.jpg")
    paths = list(good) + [os.path.join(directory, name) for name in sorted(broken)] + [str(tmp_path / "pipe.jpg")]
    # As the job's check leaves them: the size of each regular file its stat found.
    refs = [ImageRef(p, f"id{i}", size=os.stat(p).st_size if os.path.isfile(p) else None) for i, p in enumerate(paths)]
    config = PreprocessConfig()
    batches, dead = _read_batches(ReadImageBatches(config, gpu_decode=True, threads=2, prefetch=1),
                                  [refs[:9], refs[9:]])
    assert sorted(p for call in recorded_reads for p in call) == sorted(p for p in paths if os.path.isfile(p))
    want = {p: load_image(p, config, True, read_timeout_s=None) for p in paths}
    encoded = {ref.uri: (data, box) for batch in batches for ref, data, box in
               zip(batch.refs[batch.decoded_count:], batch.encoded, batch.boxes)}
    assert encoded == {p: (w.encoded, w.box) for p, w in want.items() if w.encoded is not None} and len(encoded) == 12
    assert {row["uri"]: (row["id"], row["error"], row["stage"]) for row in dead} == {
        p: (f"id{paths.index(p)}", w.error, w.stage) for p, w in want.items() if w.error is not None}


def test_a_together_read_that_stalls_is_read_again_one_file_at_a_time(corpus, tmp_path, recorded_reads, caplog):
    # The check found a regular file, then a FIFO took its place (as a stuck mount would stall): DALI's read
    # blocks, the watchdog gives the whole chunk up and reads it again file by file, where the FIFO is refused.
    import logging
    import os

    from images.pillow_decoder import PreprocessConfig
    from transforms.images import ReadImageBatches

    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    good = corpus[1][:3]
    refs = [ImageRef(good[0], size=os.stat(good[0]).st_size), ImageRef(str(fifo), size=1000),
            *[ImageRef(p, size=os.stat(p).st_size) for p in good[1:]]]
    try:
        with caplog.at_level(logging.WARNING, logger="transforms.images"):
            batches, dead = _read_batches(ReadImageBatches(PreprocessConfig(), gpu_decode=True, threads=2,
                                                           read_timeout_s=1.0), [refs])
    finally:
        os.close(os.open(fifo, os.O_WRONLY))  # the DALI read left behind opens it and finishes
        import threading

        for thread in threading.enumerate():  # its thread goes on with the abandoned chunk: let it end here
            if thread.name.startswith("read-local"):
                thread.join(timeout=30)
    assert recorded_reads and str(fifo) in recorded_reads[0]
    (batch,) = batches
    assert [r.uri for r in batch.refs] == good and all(len(data) for data in batch.encoded)
    (row,) = dead
    assert row["uri"] == str(fifo) and row["stage"] == "read" and "FIFO" in row["error"]
    assert "reading 4 files together" in caplog.text and "one at a time" in caplog.text


def test_a_together_read_that_is_slow_but_moving_is_not_read_again(corpus, recorded_reads, monkeypatch, caplog):
    # Files the pre-screen sends to Pillow are decoded inside the reader's call: each one settled is progress the
    # watchdog sees, so a batch slower in all than --read_timeout_s but never stalled is read and decoded once.
    import logging
    import os
    import time

    import images.reading as reading
    from images.pillow_decoder import PreprocessConfig
    from transforms.images import ReadImageBatches

    real = reading.screen_or_decode
    decoded = []

    def slow(data, *args):
        time.sleep(0.3)
        decoded.append(len(data))
        return real(data, *args)

    monkeypatch.setattr(reading, "screen_or_decode", slow)
    good = corpus[1][:6]
    refs = [ImageRef(p, size=os.stat(p).st_size) for p in good]
    with caplog.at_level(logging.WARNING, logger="transforms.images"):
        (batch,), dead = _read_batches(ReadImageBatches(PreprocessConfig(), gpu_decode=True, threads=2,
                                                        read_timeout_s=1.0), [refs])
    assert dead == [] and [r.uri for r in batch.refs] == good
    assert len(decoded) == 6 and "no progress" not in caplog.text, caplog.text


def test_files_read_again_alone_are_counted_in_the_jobs_metrics(corpus, recorded_reads):
    # The reader threads notice them; Beam keeps only metrics updated on the bundle's thread, where they are counted.
    import os

    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.test_pipeline import TestPipeline

    from images.pillow_decoder import PreprocessConfig
    from transforms.images import ReadImageBatches
    from transforms.timing import NAMESPACE

    good = corpus[1][:6]
    stale = [ImageRef(p, size=os.stat(p).st_size + (1 if i % 2 else 0)) for i, p in enumerate(good)]  # 3 changed
    p = TestPipeline()
    _ = (p | beam.Create([stale[:4], stale[4:]], reshuffle=False)
         | beam.ParDo(ReadImageBatches(PreprocessConfig(), gpu_decode=True, threads=2)))
    result = p.run()
    result.wait_until_finish()
    counters = {m.key.metric.name: m.committed
                for m in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]}
    assert counters["files_read_again_alone"] == 3
