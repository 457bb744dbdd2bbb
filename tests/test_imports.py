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
        from pipelines.classify_images import build_pipeline
        from pipelines.settings import resolve
        settings, options = resolve(["--input", "{tmp_path}/*.jpg", "--output", "{tmp_path}/out"], start_checks=False)
        p = beam.Pipeline(options=options)
        build_pipeline(p, settings)
        print("built", settings.engine_record()["engine"], len(p.transforms_stack))
        """)
    assert result.returncode == 0, result.stderr
    assert "built onnxruntime" in result.stdout


def test_the_environment_that_runs_jobs_has_no_torch():
    """Beam's RunInference imports torch whenever it is importable (~2 s of every job's start on 2
    cores), so `make` keeps torch in .venv-export, which only exports the model."""
    import importlib.util
    from pathlib import Path

    import pytest

    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"runs in the repository's .venv (what `make test` uses), not in {sys.prefix}")
    assert importlib.util.find_spec("torch") is None, (
        "torch is installed in .venv, the environment that runs jobs: every job would import it at start; "
        "export tooling belongs in .venv-export (requirements-export.txt, `make model`)")


def _imports(path):
    """Every module a file imports (at the top or inside functions)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


#: What transforms/ may use of engines/ (README, "How it is built"): the interface, the pure image
#: code, inside the model handler the scorer and the GPU decoder it loads, and the file API the
#: commit and --skip_scored use.
TRANSFORMS_MAY_IMPORT = {"engines.base", "engines.pillow_decoder", "engines.prescreen", "engines.scoring",
                         "engines.dali_decoder", "engines.storage"}


def test_layers_import_only_downwards():
    upward = {f"{p.relative_to(REPO)}: {m}" for p in (REPO / "engines").rglob("*.py") for m in _imports(p)
              if m.split(".")[0] in ("transforms", "pipelines", "benchmarks")}
    assert not upward, f"engines/ must not import the layers above it: {sorted(upward)}"
    into_engines = {f"{p.relative_to(REPO)}: {m}" for p in (REPO / "transforms").rglob("*.py") for m in _imports(p)
                    if m.startswith("engines.") and not any(m == a or m.startswith(a + ".")
                                                            for a in TRANSFORMS_MAY_IMPORT)}
    assert not into_engines, f"transforms/ reaches engines/ past the README's picture: {sorted(into_engines)}"
    assert not {m for p in (REPO / "transforms").rglob("*.py") for m in _imports(p) if m.startswith("pipelines")}
