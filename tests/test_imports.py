"""The pipeline imports and builds its job on a laptop with no tensorrt, no cuda and no GPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO

BLOCK_GPU_MODULES = """
import sys
for name in ("tensorrt", "tensorrt_lean", "tensorrt_bindings", "cuda", "cuda.bindings", "cupy", "torch"):
    sys.modules[name] = None  # any import of these now raises ImportError
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_GPU_MODULES + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_pipelines_import_without_tensorrt_cuda_or_torch():
    result = _run("""
        import importlib, pkgutil
        import pipelines, transforms, engines
        for package in (pipelines, transforms):
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{package.__name__}.{info.name}")
        import engines.base, engines.onnxruntime_engine, engines.storage
        print("imported", sorted(m for m in sys.modules if m.startswith(("pipelines.", "transforms."))))
        """)
    assert result.returncode == 0, result.stderr
    assert "pipelines.classify_images" in result.stdout and "transforms.inference" in result.stdout


def test_onnxruntime_job_builds_without_gpu_modules(tmp_path):
    result = _run(f"""
        import apache_beam as beam
        from pipelines.classify_images import ClassifyOptions, build_pipeline, make_handler
        from apache_beam.options.pipeline_options import PipelineOptions
        options = PipelineOptions(["--input", "{tmp_path}/*.jpg", "--output", "{tmp_path}/out"])
        handler, info, _ = make_handler(options.view_as(ClassifyOptions))
        p = beam.Pipeline(options=options)
        build_pipeline(p, options.view_as(ClassifyOptions), handler, None)
        print("built", info["engine"], len(p.transforms_stack))
        """)
    assert result.returncode == 0, result.stderr
    assert "built onnxruntime" in result.stdout


def test_the_environment_that_runs_jobs_has_no_torch():
    """Beam's RunInference imports torch whenever it is importable (~2 s of every job's start on 2
    cores, issue 13), so `make` keeps torch in .venv-export, which only exports the model."""
    import importlib.util
    from pathlib import Path

    import pytest

    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"runs in the repository's .venv (what `make test` uses), not in {sys.prefix}")
    assert importlib.util.find_spec("torch") is None, (
        "torch is installed in .venv, the environment that runs jobs: every job would import it at start; "
        "export tooling belongs in .venv-export (requirements-export.txt, `make model`)")
