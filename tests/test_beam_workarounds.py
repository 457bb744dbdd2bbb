"""pipelines/beam_workarounds.py: the Beam defects it works around, reproduced with Beam itself."""

from __future__ import annotations

import os
import re
import time

import apache_beam as beam
import pytest
from apache_beam.coders import Coder
from apache_beam.coders.coder_impl import StreamCoderImpl
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import worker_handlers
from apache_beam.testing.util import assert_that, equal_to

from pipelines import classify_images
from pipelines.beam_workarounds import whole_elements_on_the_data_plane


class Slow:
    """An element whose encoding takes longer than the data channel's 1 s time-based flush, as a block of
    rows or a batch of images does on a busy worker."""

    def __init__(self, n: int):
        self.n = n


class _SlowImpl(StreamCoderImpl):
    def encode_to_stream(self, value, out, nested):
        out.write_var_int64(value.n)
        time.sleep(1.3)  # the flusher thread runs in here
        out.write_var_int64(value.n)

    def decode_from_stream(self, in_stream, nested):
        first, second = in_stream.read_var_int64(), in_stream.read_var_int64()
        if first != second:
            raise ValueError(f"element split: {first} != {second}")
        return Slow(first)


class SlowCoder(Coder):
    def _create_impl(self):
        return _SlowImpl()

    def is_deterministic(self):
        return True

    def to_type_hint(self):
        return Slow


def _grouped_slow_elements():
    """A two-thread local pipeline whose slow elements cross a GroupByKey: the runner decodes each data
    message the worker sends on its own."""
    beam.coders.registry.register_coder(Slow, SlowCoder)
    options = PipelineOptions(["--direct_running_mode", "multi_threading", "--direct_num_workers", "2"])
    with beam.Pipeline(options=options) as p:
        grouped = (p | beam.Create([0, 1, 2, 3])
                   | beam.Map(lambda i: (i % 2, Slow(i))).with_output_types(beam.typehints.Tuple[int, Slow])
                   | beam.GroupByKey()
                   | beam.MapTuple(lambda key, values: (key, sorted(v.n for v in values))))
        assert_that(grouped, equal_to([(0, [0, 2]), (1, [1, 3])]))


def test_beams_time_based_flush_splits_an_element():
    # The defect itself, with Beam's default: if this stops failing, Beam fixed it and the workaround can go.
    # In a child with a 3 GiB address-space limit: the runner decodes the half element as whatever it reads
    # like, which can be a length of billions (once here, 24 GB of memory before the OOM killer came).
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    code = ("from apache_beam.runners.portability.fn_api_runner import worker_handlers as w; "
            "w.DATA_BUFFER_TIME_LIMIT_MS = 1000; "
            "from tests.test_beam_workarounds import _grouped_slow_elements as run; run()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode != 0, "Beam's time-based flush no longer splits elements: drop the workaround?"
    # The runner failed decoding what a worker sent (a pane, a window count or the value read from mid-element),
    # or decoded the pieces as other elements and the job's assertion saw wrong groups, or the process died with
    # no Python error at all (killed or crashed natively while decoding the garbage): all three seen here. A
    # Python error of another kind (an import, a typo) is none of these and fails the test.
    decode_failed = "decode_from_stream" in done.stderr and re.search(r"PaneInfo|element split|MemoryError",
                                                                        done.stderr)
    wrong_elements = re.search(r"BeamAssertException: Failed assert: \[\(0, \[0, 2\]\), \(1, \[1, 3\]\)\] == ",
                               done.stderr)
    died = done.returncode < 0 or not done.stderr.strip()
    assert decode_failed or wrong_elements or died, f"exit {done.returncode}: {done.stderr[-2000:]}"


def test_with_the_workaround_elements_arrive_whole(monkeypatch):
    monkeypatch.setattr(worker_handlers, "DATA_BUFFER_TIME_LIMIT_MS", 1000)
    assert whole_elements_on_the_data_plane() is True
    assert whole_elements_on_the_data_plane() is False  # idempotent
    _grouped_slow_elements()


def test_a_job_applies_it_before_its_pipeline_runs(monkeypatch, corpus, tmp_path):
    monkeypatch.setattr(worker_handlers, "DATA_BUFFER_TIME_LIMIT_MS", 1000)
    directory, good, _ = corpus
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(sorted(good)) + "\n")
    stats = classify_images.run(["--input", str(listing), "--output", str(tmp_path / "out"), "--batch_size", "4",
                                 "--direct_running_mode", "multi_threading", "--direct_num_workers", "2"])
    assert stats["predictions"] == len(good)
    assert worker_handlers.DATA_BUFFER_TIME_LIMIT_MS == 0


def _stats_per_view_as(monkeypatch, views: int = 20) -> float:
    """How many files gettext looks for while Beam builds ``views`` option views (one argparse parser each)."""
    import gettext

    from apache_beam.options.pipeline_options import StandardOptions

    looked = []
    real_exists = os.path.exists
    monkeypatch.setattr(gettext.os.path, "exists", lambda path: looked.append(path) or real_exists(path))
    options = PipelineOptions([])
    for _ in range(views):
        options.view_as(StandardOptions)
    monkeypatch.setattr(gettext.os.path, "exists", real_exists)
    return len(looked) / views


def test_beam_looks_up_argparses_translations_for_every_option_view_and_the_cache_does_it_once(monkeypatch):
    import gettext

    from pipelines.beam_workarounds import cache_translation_lookups

    # The uncached lookup (a job run by an earlier test installed the cache), restored after the test.
    monkeypatch.setattr(gettext, "find", getattr(gettext.find, "_uncached", gettext.find))
    monkeypatch.setenv("LANGUAGE", "de_DE.UTF-8")  # a locale whose catalogs this machine lacks: files to look for
    found_before = gettext.find("argparse", None, None, True)
    assert _stats_per_view_as(monkeypatch) >= 4  # Beam's view_as builds a parser, and the parser looks them up
    assert cache_translation_lookups() is True
    assert cache_translation_lookups() is False  # once per process
    _stats_per_view_as(monkeypatch, 1)  # the first lookups of this locale fill the cache
    assert _stats_per_view_as(monkeypatch) == 0
    assert gettext.find("argparse", None, None, True) == found_before  # the same answers
    # Another locale in the environment is looked up afresh, not answered from the first one's cache.
    monkeypatch.setenv("LANGUAGE", "fr_FR.UTF-8")
    assert _stats_per_view_as(monkeypatch, 1) > 0


def test_a_job_caches_translation_lookups_before_it_resolves_its_options(monkeypatch, corpus, tmp_path):
    import gettext

    from pipelines import beam_workarounds

    monkeypatch.setattr(gettext, "find", getattr(gettext.find, "_uncached", gettext.find))
    applied = []
    real = beam_workarounds.cache_translation_lookups
    monkeypatch.setattr(beam_workarounds, "cache_translation_lookups", lambda: applied.append(1) or real())
    monkeypatch.setattr(classify_images, "resolve", lambda argv: (_ for _ in ()).throw(RuntimeError("resolved")))
    with pytest.raises(RuntimeError, match="resolved"):
        classify_images.run(["--input", str(corpus), "--output", str(tmp_path / "out")])
    assert applied == [1]


def _record_slow_exit(folder: str) -> None:
    start = time.time()
    time.sleep(1.0)  # a worker's exit that takes a while, as one holding a CUDA context and a DALI pipeline does
    with open(os.path.join(folder, f"{os.getpid()}.txt"), "w") as f:
        f.write(f"{start} {time.time()}")


class _SlowExit(beam.DoFn):
    """Makes each SDK worker process that runs it take 1 s to exit, and write when its exit began and ended."""

    def __init__(self, folder: str):
        self._folder = folder

    def setup(self):
        import atexit

        atexit.register(_record_slow_exit, self._folder)

    def process(self, element):
        yield element


def _worker_exits(folder) -> list:
    """``[(began, ended)]`` of the exits of a two-process local pipeline's SDK workers, in order of beginning."""
    options = PipelineOptions(["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"])
    with beam.Pipeline(options=options) as p:
        _ = p | beam.Create(range(40)) | beam.Reshuffle() | beam.ParDo(_SlowExit(str(folder)))
    exits = sorted(tuple(map(float, path.read_text().split())) for path in folder.iterdir())
    assert len(exits) == 2, exits  # both workers ran the step: each exit was recorded
    return exits


def _uncloses(monkeypatch):
    """Beam's own ``close_all`` for this test (a job run by an earlier test installed the workaround)."""
    manager = worker_handlers.WorkerHandlerManager
    monkeypatch.setattr(manager, "close_all", getattr(manager.close_all, "_beams", manager.close_all))


def test_beam_stops_its_sdk_worker_processes_one_after_another(monkeypatch, tmp_path):
    # The cost itself, with Beam's close_all (worker_handlers.WorkerHandlerManager): each worker is told to
    # stop and waited for before the next is told, so a job's exit waits for the sum of its workers' exits.
    # If this stops failing, Beam stops them together and the workaround can go.
    _uncloses(monkeypatch)
    (first_began, first_ended), (second_began, _) = _worker_exits(tmp_path)
    assert second_began >= first_ended


def test_with_the_workaround_sdk_worker_processes_stop_together(monkeypatch, tmp_path):
    from pipelines.beam_workarounds import stop_workers_together

    _uncloses(monkeypatch)
    assert stop_workers_together() is True
    assert stop_workers_together() is False  # idempotent
    (first_began, first_ended), (second_began, second_ended) = _worker_exits(tmp_path)
    assert second_began < first_ended  # the second began its exit while the first was still exiting


def test_a_local_job_stops_its_workers_together(monkeypatch, corpus, tmp_path):
    _uncloses(monkeypatch)
    directory, good, _ = corpus
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(sorted(good)) + "\n")
    stats = classify_images.run(["--input", str(listing), "--output", str(tmp_path / "out"), "--batch_size", "4",
                                 "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"])
    assert stats["predictions"] == len(good) and stats["unaccounted"] == 0
    assert getattr(worker_handlers.WorkerHandlerManager.close_all, "_beams", None) is not None
