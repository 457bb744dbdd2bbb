"""Runs whose ``pipeline.run()`` only submits the job: wait for it, or say what was submitted.

A Flex Template launch is the common case. Google's launcher runs the program with
``--template_location gs://.../template_launches/<id>/job_object``; Beam's DataflowRunner then
stages the pipeline, writes the job object there and returns a result with no job behind it
(``DataflowApplicationClient.create_job`` returns None "if there is no need to send a request to
the service (e.g. template creation)"; that result's ``wait_until_finish`` returns DONE at once).
The launcher submits the job object after the program exits, so the program must exit 0 without
looking for the run's ``_SUCCESS``, which no step has written yet. The same holds for
``--dry_run`` (Beam builds the job and submits nothing) and for any runner whose wait returns
while the job is still going (a state that is not terminal). See docs/scheduling.md.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions, TestOptions
from apache_beam.runners.runner import PipelineState

_LOG = logging.getLogger(__name__)


def _job_id(result) -> Optional[str]:
    """The runner's job id, if its result has one (a template launch's has none)."""
    try:
        return str(result.job_id()) if getattr(result, "has_job", True) else None
    except (AttributeError, NotImplementedError):  # DirectRunner results and job-less Dataflow results
        return None


def submitted(options: PipelineOptions, result, output: str, run_id: str,
              state: Optional[str] = None) -> Dict[str, Any]:
    """The summary of a run that only submitted its job (what ``main`` prints)."""
    gcp = options.view_as(GoogleCloudOptions)
    return {"submitted": True, "runner": str(options.view_as(StandardOptions).runner),
            "job_id": _job_id(result), "template_location": gcp.template_location,
            "dry_run": bool(options.view_as(TestOptions).dry_run), "state": state,
            "output": output, "run_id": run_id}


def wait_unless_submit_only(options: PipelineOptions, result, output: str, run_id: str) -> Optional[Dict[str, Any]]:
    """Waits for the job the result stands for, unless this run only submitted it.

    Args:
        options: The job's options.
        result: What ``pipeline.run()`` returned.
        output: The partition the job commits (``--output``, dates filled).
        run_id: The run id its ``_SUCCESS`` will carry.

    Returns:
        None when the job ran to a terminal state here (its ``_SUCCESS`` can be read now); else the
        :func:`submitted` summary: for ``--template_location`` and ``--dry_run`` without waiting,
        and for a wait that returned while the job was still going.
    """
    if options.view_as(GoogleCloudOptions).template_location or options.view_as(TestOptions).dry_run:
        return submitted(options, result, output, run_id)
    state = result.wait_until_finish()
    if state is None:  # some runners' wait returns nothing; their result still knows
        state = result.state
    if PipelineState.is_terminal(state):
        return None
    _LOG.info("the runner returned with the job %s; not waiting for its commit", state)
    return submitted(options, result, output, run_id, state=str(state))


def describe(summary: Dict[str, Any]) -> str:
    """One line for the launcher's output, saying what was submitted and where its result will be."""
    then = (f"when the job finishes, {summary['output']} is committed by run {summary['run_id']} "
            f"(its _SUCCESS carries that run id)")
    if summary["template_location"]:
        return f"submitted: the job object is at {summary['template_location']}, for the template launcher to start; " + then
    if summary["dry_run"]:
        return f"dry run: the job was built and not submitted; nothing will be written to {summary['output']}"
    job = f"job {summary['job_id']}" if summary["job_id"] else "the job"
    return f"submitted {job} to {summary['runner']} (state {summary['state']}); " + then
