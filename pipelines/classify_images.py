"""Score a folder, bucket or manifest of images with an image classifier on Apache Beam.

    python -m pipelines.classify_images --input 'gs://bucket/photos/*.jpg' --output gs://bucket/scored \\
        [--engine NAME] [engine flags] [--batch_size N] [--top_k K] \\
        [--output_format jsonl|parquet] [any Beam pipeline option: --runner, --direct_num_workers, ...]

Outputs in ``--output/run-RUN_ID/``: ``predictions-*.jsonl`` (or ``.parquet``), one row per image
``{"uri", "model", "top_k": [{"class_id", "label", "score"}, ...]}`` (a manifest's ``id`` and kept
columns after ``uri``; the model's raw outputs with ``--output_mode raw``); ``dead_letter-*.jsonl`` with
``{"uri", "error", "stage"}`` (and the same ``id`` and columns) for every input that could not be scored;
``stats.json`` and ``stats.png`` with throughput and per-stage timing; ``_scored-*.jsonl`` (what
was scored, for ``--skip_scored``). ``--output/_SUCCESS``, swapped in last by the commit step,
names the committed run and lists its files: read those (transforms/commit.py).
Every input ends as exactly one prediction or one dead-letter row (or is skipped with
``--skip_scored``). Each run replaces ``--output`` as a whole; ``{date}`` in ``--input`` and
``--output`` is filled from ``--run_date`` (docs/scheduling.md).

The flags are parsed, checked and resolved once by ``pipelines.settings.resolve`` into a frozen
``RunSettings``; this module builds the job from it and runs it. Engines and their flags are
``pipelines/engine_registry.py``'s business: nothing here depends on which engine runs.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Dict, List, Optional

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from engines.base import EngineError, UsageError
from pipelines import beam_workarounds, partitions, run_record, submission
from pipelines.settings import RunSettings, resolve
from pipelines.stats import ProgressPrinter
from transforms.images import DEAD_LETTER, CountDeadLetters, ImageBatch, ImageRefs, ReadImageBatches
from transforms.inference import ImageBatchHandler, Preload, ScorerLoader
from transforms.commit import CommitConflict
from transforms.postprocess import FailedBatchToDeadLetters, PredictionRows
from transforms.scored import CheckScored

_LOG = logging.getLogger(__name__)


def make_loader(settings: RunSettings) -> ScorerLoader:
    """The recipe of the run's model: engine, decoders, warm-up (nothing is loaded here)."""
    return ScorerLoader(settings.recipe.loader, settings.decode.dali, settings.preprocess,
                        max_decoders=settings.decode.max_decoders, warmup_images=settings.batch.images_per_batch)


def make_handler(settings: RunSettings, loader: Optional[ScorerLoader] = None,
                 score_ahead: str = "") -> ImageBatchHandler:
    """The image pipeline's model handler, from the run's settings (no engine is loaded here).

    Args:
        settings: The run's settings.
        loader: The model's recipe (a :class:`transforms.inference.Preload`'s). Default: :func:`make_loader`.
        score_ahead: The token the handler registers its loaded scorer under for the reader
            (``transforms.ahead``), or "". Default "".

    Raises:
        EngineError: batch settings the handler cannot take (a bug: the flags were checked).
    """
    return ImageBatchHandler(
        loader or make_loader(settings),
        settings.rows.output_names, images_per_batch=settings.batch.images_per_batch,
        batches_per_call=settings.batch.batches_per_call,
        share_across_processes=settings.share_model_across_processes, model_copies=settings.model_copies,
        metrics_namespace=settings.engine, model_id=settings.model.identity, score_ahead=score_ahead)


def build_pipeline(pipeline: beam.Pipeline, settings: RunSettings, plan=None,
                   progress_dir: Optional[str] = None, loader: Optional[ScorerLoader] = None) -> Any:
    """Adds the scoring transforms to ``pipeline``, ending with the commit of ``--output``.

    Batches, not images, travel through Beam: refs are grouped, each batch is read (and on the
    CPU path decoded) by a thread pool, scored in one RunInference element, and written as one
    block of rows. Rows go to the run's own folder; the last step commits them (transforms/commit.py),
    so a failed run or a rerun never leaves a mix of runs in ``--output``.

    Args:
        pipeline: The pipeline to add to.
        settings: The run's settings (:func:`pipelines.settings.resolve`): the reader, the model
            handler and the sinks take their parts of it.
        plan: The run's ``transforms.commit.CommitPlan``. Default: a new run into ``--output``.
        progress_dir: Where workers of a local run publish their counts for progress lines, or None.
        loader: The model's recipe for :func:`make_handler` (a :class:`transforms.inference.Preload`'s).
            Default: :func:`make_loader`.

    Returns:
        (prediction row blocks, dead-letter rows) PCollections.
    """
    plan = plan or partitions.make_plan(settings)
    # The reader starts each batch on the scorer the handler loads in the same process (transforms.ahead).
    ahead = uuid.uuid4().hex if settings.batch.score_ahead else ""
    handler = make_handler(settings, loader, ahead)
    found = pipeline | "FindImages" >> ImageRefs(settings.input, batch_size=settings.batch.images_per_batch,
                                                 keep_columns=settings.keep_columns)
    checked = found["refs"] | "CheckScored" >> CheckScored(plan.skip_root, plan.output, plan.replaces, plan.model)
    read = checked["refs"] | "ReadBatches" >> beam.ParDo(
        ReadImageBatches(settings.preprocess, gpu_decode=settings.decode.encoded, threads=settings.read_threads,
                         prefetch=settings.batch.prefetch, read_timeout_s=settings.read_timeout_s,
                         score_ahead=ahead)
    ).with_outputs(DEAD_LETTER, main="batches")
    # Typed here, not with with_output_types: Beam's runtime type checks hold every output of a ParDo, dead
    # letters too, to its one output hint. The type gives the batches transforms.images.ImageBatchCoder.
    read.batches.element_type = ImageBatch
    main, failed = read.batches | "RunInference" >> RunInference(handler).with_exception_handling()
    scored = main | "Rows" >> beam.ParDo(PredictionRows(settings.rows, settings.labels, progress_dir)).with_outputs(
        DEAD_LETTER, main="rows")
    failed_rows = failed.failed_inferences | "FailedBatches" >> beam.ParDo(FailedBatchToDeadLetters())
    dead = ((found[DEAD_LETTER], read[DEAD_LETTER], scored[DEAD_LETTER], failed_rows)
            | "AllDeadLetters" >> beam.Flatten()
            | "CountDeadLetters" >> beam.ParDo(CountDeadLetters(progress_dir)))
    partitions.write_and_commit(plan, found, checked, scored.rows, dead, settings.output_format,
                                bigquery=settings.bigquery, rows=settings.rows)
    return scored.rows, dead


def run(argv: Optional[List[str]] = None, started: Optional[threading.Event] = None) -> Dict[str, Any]:
    """Parses arguments, runs the job, writes stats.json and stats.png, returns the stats; a run that only
    submits its job (a Flex Template launch) returns its summary instead (pipelines/submission.py).

    Args:
        argv: The command line. Default: ``sys.argv[1:]``.
        started: Set once every start check has passed, just before the pipeline is built and run, so
            a caller can tell a setup mistake (raised before) from a failure of the running job (after):
            :func:`main` exits 2 for the first and 1 for the second. Default: None.

    Raises:
        UsageError, EngineError, ImportError: a setup mistake found before ``started`` is set (see
            :func:`pipelines.settings.resolve`).
        CommitConflict: another run committed ``--output`` after this one was launched.
    """
    # Beam builds an argparse parser per option view, each looking up argparse's catalogs (beam_workarounds.py).
    beam_workarounds.cache_translation_lookups()
    settings, options = resolve(argv if argv is not None else sys.argv[1:])
    plan = partitions.make_plan(settings)
    engine_info, record = settings.engine_record(), settings.record()
    _LOG.info("scoring %s -> %s with %s", settings.input, settings.output, engine_info)
    progress_dir = (tempfile.mkdtemp(prefix="classify-progress-") if settings.local and settings.progress_every_s > 0
                    else None)
    if started is not None:
        started.set()  # the start checks are over: what fails from here on fails a running job
    if settings.local:
        # The DirectRunner's gRPC data channels otherwise flush on a timer, mid-element (beam_workarounds.py).
        beam_workarounds.whole_elements_on_the_data_plane()
        # Its SDK worker processes otherwise stop one after another when it ends (beam_workarounds.py).
        beam_workarounds.stop_workers_together()
    # Workers in this process: the model loads now, while the job is built and its inputs listed.
    preload = Preload(make_loader(settings)) if settings.workers_in_process else None
    start = time.monotonic()
    try:
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, settings, plan, progress_dir, preload.loader if preload else None)
        printer = ProgressPrinter(progress_dir, settings.progress_every_s) if progress_dir else contextlib.nullcontext()
        with printer:
            try:
                result = pipeline.run()
                # A Flex Template launch (--template_location) only writes the job object: no wait, no _SUCCESS.
                submitted = submission.wait_unless_submit_only(options, result, settings.output, plan.run_id)
            except Exception as e:
                conflict = partitions.concurrent_commit(plan)
                if conflict is not None:  # the real cause, whatever step noticed it first
                    raise conflict from e
                raise
        wall = time.monotonic() - start
    finally:
        if preload is not None:
            preload.close()  # a job that ended before its scoring step loaded the model
        if progress_dir:
            shutil.rmtree(progress_dir, ignore_errors=True)
    if submitted:
        return submitted
    # The commit step wrote stats.json with the committed counts; add the timing only metrics know.
    committed = partitions.read_committed(settings.output)
    metrics = run_record.collect_metrics(result)
    if committed["run_id"] != plan.run_id:
        # This run's commit succeeded (the step raises otherwise), and a run launched after it has
        # already replaced it: report this run's counts from its metrics; its files are gone.
        _LOG.warning("%s was committed by this run (%s) and already replaced by run %s, launched later",
                     settings.output, plan.run_id, committed["run_id"])
        return run_record.replaced_run_stats(metrics, wall, engine_info, record, plan.run_id, committed["run_id"])
    stats = run_record.add_launcher_timing(plan.run_folder, committed, engine_info, record, metrics, wall)
    if stats["unaccounted"]:
        _LOG.error("%d of %d inputs ended as neither a prediction nor a dead letter; please report this with "
                   "stats.json", stats["unaccounted"], stats["inputs"])
    return stats


def per_device(stats: Dict[str, Any]) -> str:
    """" (gpu0 30000, gpu1 29990 images)" when more than one device scored, else ""."""
    devices = stats.get("images_per_device") or {}
    if len(devices) < 2:
        return ""
    return " (" + ", ".join(f"{name} {n}" for name, n in devices.items()) + " images)"


#: Errors raised before the pipeline starts that are setup mistakes: exit status 2, the message names the flag.
SETUP_MISTAKES = (UsageError, EngineError, ImportError)
#: Failures :func:`main` reports in one line without a traceback: setup mistakes, and the engine, a library,
#: the disk or the network failing while the job runs, another run committing the partition first (exit
#: status 1). Any other exception is a bug and keeps its traceback.
EXPECTED_FAILURES = SETUP_MISTAKES + (OSError, MemoryError, CommitConflict)


class _NoTracebackForExpectedFailures(logging.Filter):
    """Keeps Beam's log line of a failed step but drops its traceback when the failure is expected.

    Beam logs every exception a step raises with its traceback before re-raising it
    (``apache_beam.runners.common``); for an expected failure :func:`main` prints the reason itself,
    and the line alone still shows a bundle that failed and was retried.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], EXPECTED_FAILURES):
            record.exc_info = record.exc_text = None
        return True


def _caused_by_expected(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, EXPECTED_FAILURES):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: exit status 0 when the job ran, 2 for a setup mistake found at start, 1 for a
    failure after the job started or when every input failed for one reason (README, "Exit status")."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _NoTracebackForExpectedFailures) for f in handler.filters):
            handler.addFilter(_NoTracebackForExpectedFailures())
    started = threading.Event()
    try:
        stats = run(argv if argv is not None else sys.argv[1:], started)
    except EXPECTED_FAILURES as e:
        if not started.is_set() and isinstance(e, SETUP_MISTAKES):
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        print(f"error: the job failed{' after it started' if started.is_set() else ''}: {_one_line(e)}",
              file=sys.stderr)
        return 1
    except RuntimeError as e:
        # Beam's runners re-raise a step's exception as a RuntimeError whose message is the original
        # one ("OSError: [Errno 28] ... [while running 'WriteScored/...']"): expected when an expected
        # failure is in its chain, a bug otherwise.
        if not (started.is_set() and _caused_by_expected(e)):
            raise
        print(f"error: the job failed after it started: {_one_line(e)}", file=sys.stderr)
        return 1
    if stats.get("submitted"):
        print(submission.describe(stats))
        return 0
    unlistable = stats.get("unlistable_directories")
    print(f"scored {stats['predictions']} images, {stats['dead_letters']} dead letters"
          f"{f' ({unlistable} of them directories that could not be listed)' if unlistable else ''}, "
          f"{stats['skipped']} skipped as already scored, "
          f"{stats['images_per_second']} images/s{per_device(stats)}; "
          + (f"stats in {stats['stats_file']}" if stats.get("stats_file") else
             f"then replaced by run {stats['run'].get('replaced_by')}"))
    if stats.get("setup_problem"):
        print(f"error: {stats['setup_problem']}; the rows are in {stats['settings']['output']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
