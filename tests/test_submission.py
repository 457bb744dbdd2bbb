"""pipelines/submission.py: which runs only submit their job, and what the launcher says then.

The Flex Template launch itself (``--template_location``, DataflowRunner, network off) is
tests/test_flex_launch.py; these cover the other submit-only cases with real Beam results.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult, PipelineState

from pipelines import submission

DATAFLOW = ["--runner=DataflowRunner", "--project=test-project", "--region=us-central1",
            "--temp_location=gs://some-bucket/tmp", "--sdk_location=container", "--sdk_container_image=x/beam:test"]


def _run(flags):
    options = PipelineOptions(flags)
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | beam.Create([1, 2, 3]) | beam.Map(lambda x: x * 2)
    return options, pipeline.run()


def test_a_dry_run_is_a_submission_and_is_not_waited_for():
    # Beam's DataflowRunner builds the job and submits nothing (no network needed: TestOptions.dry_run).
    options, result = _run(DATAFLOW + ["--dry_run=True"])
    summary = submission.wait_unless_submit_only(options, result, "gs://some-bucket/out", "run-1")
    assert summary["submitted"] and summary["dry_run"] and summary["run_id"] == "run-1"
    assert submission.describe(summary).startswith("dry run: the job was built and not submitted")


def test_a_template_location_is_a_submission_without_waiting():
    options = PipelineOptions(DATAFLOW + ["--template_location=gs://some-bucket/template_launches/1/job_object"])

    class NeverWaited(PipelineResult):
        def wait_until_finish(self, duration=None):
            raise AssertionError("a template launch must not wait: there is no job yet")

    summary = submission.wait_unless_submit_only(options, NeverWaited(PipelineState.DONE), "gs://some-bucket/out", "r")
    line = submission.describe(summary)
    assert "gs://some-bucket/template_launches/1/job_object" in line and "gs://some-bucket/out" in line, line


def test_a_wait_that_returns_while_the_job_runs_is_a_submission():
    class StillRunning(PipelineResult):
        """What a remote runner's result returns from a wait that ends before the job (Beam's
        DataflowPipelineResult does with a duration): a state that is not terminal."""

        def wait_until_finish(self, duration=None):
            return PipelineState.RUNNING

        def job_id(self):
            return "2024-05-31_01_02_03-42"

    options = PipelineOptions(DATAFLOW)
    summary = submission.wait_unless_submit_only(options, StillRunning(PipelineState.RUNNING), "gs://b/out", "r-9")
    assert summary["state"] == "RUNNING" and summary["job_id"] == "2024-05-31_01_02_03-42"
    assert submission.describe(summary).startswith("submitted job 2024-05-31_01_02_03-42 to DataflowRunner "
                                                   "(state RUNNING); when the job finishes, gs://b/out is committed "
                                                   "by run r-9")


def test_a_local_run_is_waited_for_to_its_end():
    options, result = _run(["--runner=DirectRunner"])
    assert submission.wait_unless_submit_only(options, result, "/tmp/out", "r") is None
    assert result.state == PipelineState.DONE
