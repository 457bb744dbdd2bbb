"""Beam's local runner hands the pipeline's options to its steps as Dataflow's workers do.

Put this folder on ``PYTHONPATH`` (Python imports ``sitecustomize`` at start) to run a job on the
DirectRunner against a BigQuery emulator with ``--bigquery_endpoint``. Beam's BigQuery file-load steps
(``TriggerLoadJobs``, ``WaitForBQJobs``, ``TriggerCopyJobs``, ...) build their client on the worker
without the pipeline's options and read the endpoint from ``RuntimeValueProvider``'s runtime options
(``apache_beam/io/gcp/bigquery_tools.py``, ``_get_bigquery_endpoint``). Dataflow's worker harness sets
those from the job's options (``apache_beam/runners/worker/sdk_worker_main.py``); Beam 2.78's FnApiRunner,
which runs a local job, sets them to ``{}`` (``fn_runner.py``, ``run_pipeline``), so those steps would
call bigquery.googleapis.com while the launcher's checks call the endpoint. Here the FnApiRunner sets
the job's own options instead. Nothing else changes, and nothing happens until Beam's runner module is
imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_RUNNER = "apache_beam.runners.portability.fn_api_runner.fn_runner"


def install(fn_runner) -> None:
    """Makes ``fn_runner.FnApiRunner.run_pipeline`` set the pipeline's options as the runtime options."""
    from apache_beam.options.value_provider import RuntimeValueProvider

    if getattr(fn_runner.FnApiRunner.run_pipeline, "_keeps_options", False):
        return
    run_pipeline = fn_runner.FnApiRunner.run_pipeline

    class _JobOptions(RuntimeValueProvider):
        options: dict = {}

        @classmethod
        def set_runtime_options(cls, _empty):  # fn_runner passes {}: what Dataflow's harness passes instead
            RuntimeValueProvider.set_runtime_options(cls.options)

    def keeping_options(self, pipeline, options):
        _JobOptions.options = options.get_all_options(drop_default=True)
        return run_pipeline(self, pipeline, options)

    keeping_options._keeps_options = True
    fn_runner.RuntimeValueProvider = _JobOptions
    fn_runner.FnApiRunner.run_pipeline = keeping_options


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _RUNNER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            install(module)

        spec.loader.exec_module = exec_module
        return spec


if _RUNNER in sys.modules:
    install(sys.modules[_RUNNER])
else:
    sys.meta_path.insert(0, _PatchOnImport())
