"""The pipeline imports and builds its job on a laptop with no tensorrt, no cuda and no GPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

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
        import pipelines, transforms, images, engines
        for package in (pipelines, transforms, images):
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


def test_a_job_on_the_cpu_does_not_import_dali_to_choose_its_decoder(tmp_path):
    # Whether DALI imports matters only where the engine runs on a GPU; importing it took 0.4 s of a CPU
    # job's 1.8 s launch on 2 cores (py-spy).
    code = f"""
        from pipelines.settings import resolve
        for flags in ([], ["--decode", "auto"]):
            settings, _ = resolve(["--input", "{tmp_path}/*.jpg", "--output", "{tmp_path}/out", *flags],
                                  start_checks=False)
            print(settings.decode.mode, "nvidia.dali" in sys.modules)
        """
    result = subprocess.run([sys.executable, "-c", "import sys\n" + textwrap.dedent(code)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cpu", "False", "cpu", "False"]


def test_the_environment_that_runs_jobs_has_no_torch():
    """Beam's RunInference imports torch whenever it is importable (~2 s of every job's start on 2
    cores), so `make` keeps torch in .venv-export, which only exports the model."""
    import importlib.util
    from pathlib import Path

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


#: What each package may import of the project (README, "How it is built"): a name allows that module
#: and everything under it. Layers import only downwards, pipelines -> transforms -> images -> engines;
#: images/ uses engines/ through the interface, the GPU count, the CUDA runtime wrappers (the decoder's
#: device buffers) and the file API; transforms/ uses images/ and, of engines/, the interface (the model
#: handler), the GPU memory check at load, the file API (the commit, --skip_scored) and the activations
#: post-processing applies.
#: engines/ imports nothing above it: no engine loader needs a decoder, the scorer that joins the two
#: (images/scoring.py) is loaded by the model handler in transforms/. model_tools/ (build, validate,
#: export) uses engines/ and images/; only tests import it.
MAY_IMPORT = {
    "engines": set(),
    "images": {"engines.base", "engines.devices", "engines.cuda", "engines.storage"},
    "transforms": {"images", "engines.base", "engines.gpu_memory", "engines.storage", "engines.activations"},
    "pipelines": {"transforms", "images", "engines"},
    "benchmarks": {"pipelines", "transforms", "images", "engines"},
    "model_tools": {"images", "engines"},
}
PROJECT = set(MAY_IMPORT)


def _allowed(package, module):
    top = module.split(".")[0]
    if top not in PROJECT or top == package:
        return True
    if module == top:  # `from engines import storage` names the package itself beside engines.storage
        return any(a.split(".")[0] == top for a in MAY_IMPORT[package])
    return any(module == a or module.startswith(a + ".") for a in MAY_IMPORT[package])


def _violations(package):
    return sorted(f"{p.relative_to(REPO)}: {m}" for p in (REPO / package).rglob("*.py") for m in _imports(p)
                  if not _allowed(package, m))


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_layers_import_only_downwards(package):
    assert (REPO / package / "__init__.py").exists()
    assert not _violations(package), (f"{package}/ imports past the README's picture (may use "
                                      f"{sorted(MAY_IMPORT[package]) or 'nothing of the project'}): "
                                      f"{_violations(package)}")


def test_the_layer_check_can_fail():
    assert not _allowed("engines", "images.scoring") and not _allowed("images", "transforms.images")
    assert not _allowed("transforms", "engines.onnxruntime_engine") and not _allowed("pipelines", "model_tools.build")
    assert _allowed("transforms", "images.reading.load_image") and _allowed("transforms", "engines")


def test_the_image_code_imports_without_beam():
    """images/ has no Beam in it: Beam's filesystems come in through engines.storage, for URLs only."""
    result = _run("""
        import importlib, pkgutil
        import images
        for info in pkgutil.iter_modules(images.__path__):
            importlib.import_module(f"images.{info.name}")
        print(sorted(m for m in sys.modules if m.split(".")[0] == "apache_beam"))
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_ml_dtypes_that_onnx_imports_is_one_that_registers_its_types_quickly():
    """onnx imports ml_dtypes at its own import, in the launcher (the start checks read the model) and in every
    worker that loads one. ml_dtypes 0.7.0 spends ~0.6 s of its extension's init in numpy's ufunc promoter
    registration (PyUFunc_AddPromoter), holding the GIL; 0.5.4 and 0.6.0 take ~3 ms (benchmarks/NOTES.md,
    "ml_dtypes"). setup.py and the Dockerfile keep it below 0.7."""
    from importlib.metadata import version

    from packaging.version import Version

    assert Version(version("ml_dtypes")) < Version("0.7"), (
        f"ml_dtypes {version('ml_dtypes')} is installed: pip install 'ml_dtypes<0.7' (setup.py asks for it)")
