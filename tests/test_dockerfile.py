"""The worker image's recipe, checked statically (no Docker engine runs on our build machines).

What a Dataflow worker needs from the Dockerfile and what drifts silently when someone edits
one pin: every version pinned once at the top and in the constraints file, each pin inside
the range setup.py asks for, Beam's SDK harness from the same Beam release and Python minor
version, an entrypoint that runs NVIDIA's CUDA set-up and then Beam's ``boot`` with the
worker's arguments (run here against stand-in scripts), and the project's packages copied in.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _top_args():
    """ARG NAME=VALUE lines before the first FROM (the one place versions are pinned)."""
    head = DOCKERFILE.split("\nFROM ", 1)[0]
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", head, flags=re.M))


def _stages():
    """{stage name: its text} for every FROM ... AS name (the last, unnamed FROM as 'default')."""
    parts = re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]
    stages = {}
    for part in parts:
        first = part.splitlines()[0]
        match = re.search(r"\bAS (\w+)", first)
        stages[match.group(1) if match else "default"] = part
    return stages


def _run_steps(stage):
    """The stage's RUN instructions, each with its continuation lines, as written."""
    return re.findall(r"^RUN (?:.*\\\n)*.*$", _stages()[stage], flags=re.M)


def _setup_requirements():
    tree = ast.parse((REPO / "setup.py").read_text())
    beam = next(node.value.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and getattr(node.targets[0], "id", None) == "BEAM")
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    keywords = {k.arg: k.value for k in call.keywords}
    install = [beam] + [e.value for e in keywords["install_requires"].elts if isinstance(e, ast.Constant)]
    extras = {ast.literal_eval(k): [ast.literal_eval(v) for v in vals.elts]
              for k, vals in zip(keywords["extras_require"].keys, keywords["extras_require"].values)}
    return {Requirement(r).name: Requirement(r) for r in install + extras["tensorrt"]}


def test_every_arg_used_is_pinned_once_at_the_top():
    pins = _top_args()
    used = set(re.findall(r"\$\{(\w+)\}", DOCKERFILE))
    assert used <= set(pins) | {"numpy_version"}, used - set(pins)
    head = DOCKERFILE.split("\nFROM ", 1)[0]
    for name in pins:
        assert len(re.findall(rf"^ARG {name}=", head, flags=re.M)) == 1, name
    # A stage sees a top-level ARG only if it re-declares it: every stage that uses one does.
    for stage, text in _stages().items():
        body = text.split("\n", 1)[1] if "\n" in text else ""
        for name in set(re.findall(r"\$\{(\w+)\}", body)) & set(pins):
            assert re.search(rf"^ARG {name}$", body, flags=re.M), f"stage {stage} uses {name} without ARG {name}"


def test_pins_fall_inside_setup_py_ranges():
    pins = _top_args()
    wanted = _setup_requirements()
    pinned = {"apache-beam": pins["BEAM_VERSION"], "onnx": pins["ONNX_VERSION"], "ml_dtypes": pins["ML_DTYPES_VERSION"],
              "onnxruntime": pins["ONNXRUNTIME_GPU_VERSION"], "pillow": pins["PILLOW_VERSION"],
              "pyarrow": pins["PYARROW_VERSION"], "orjson": pins["ORJSON_VERSION"],
              "cuda-python": pins["CUDA_PYTHON_VERSION"],
              "onnxconverter-common": pins["ONNXCONVERTER_COMMON_VERSION"]}
    for name, version in pinned.items():
        assert wanted[name].specifier.contains(version), f"Dockerfile pins {name}=={version}, setup.py wants {wanted[name]}"
    assert pins["NUMPY_VERSION"] == "image"  # NVIDIA's bindings are built against the image's numpy


def test_constraints_file_carries_every_pin():
    constraints = re.search(r"printf '%s\\n' (.*?)> /opt/constraints.txt", DOCKERFILE, flags=re.S).group(1)
    listed = dict(re.findall(r'"([\w-]+)==\$\{?(\w+)\}?"', constraints))
    # Every package the worker installs from setup.py is held to a pin, and every pin is one from the top.
    # onnxruntime (setup.py's, for laptops) is onnxruntime-gpu in the image (its own test below).
    missing = set(_setup_requirements()) - set(listed) - {"onnxruntime"}
    assert "onnxruntime-gpu" in listed
    assert not missing, f"setup.py installs {sorted(missing)} in the worker with no pin in /opt/constraints.txt"
    assert set(listed.values()) <= set(_top_args()) | {"numpy_version"}, listed
    assert "ENV PIP_CONSTRAINT=/opt/constraints.txt" in DOCKERFILE


def test_beam_sdk_harness_matches_and_boots_the_worker():
    stages = _stages()
    # The harness comes from the same Beam release and Python minor the worker installs and runs.
    assert re.match(r"apache/beam_python\$\{PYTHON_VERSION\}_sdk:\$\{BEAM_VERSION\} ", stages["beam_sdk"])
    worker = stages["worker"]
    assert worker.startswith("${TENSORRT_IMAGE} AS worker")
    assert re.search(r"^COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam$", worker, flags=re.M)
    assert "RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1" in worker  # no fresh virtualenv on every worker start
    assert re.search(r"apache-beam(\[\w+\])?==\$\{BEAM_VERSION\}", worker)
    # ... and the build proves it: the installed Beam and the base image's Python are checked.
    assert re.search(r"apache_beam\.__version__ == .\$\{BEAM_VERSION\}", worker)
    assert re.search(r"sys\.version_info\[:2\]", worker) and "${PYTHON_VERSION}" in worker
    assert stages["default"].strip() == "worker"  # `docker build .` gives the worker, not the test stage


@pytest.mark.parametrize("package", ["engines", "images", "model_tools", "transforms", "pipelines"])
def test_project_packages_are_copied_and_installed(package):
    assert re.search(rf"^COPY {package} {package}$", DOCKERFILE, flags=re.M)
    assert (REPO / package / "__init__.py").exists()


def _entrypoint(stage="worker"):
    """The stage's ENTRYPOINT as an argv list (exec form)."""
    (line,) = re.findall(r"^ENTRYPOINT (.*)$", _stages()[stage], flags=re.M)
    return json.loads(line)


NVIDIA_ENTRYPOINT = "/opt/nvidia/nvidia_entrypoint.sh"
BEAM_BOOT = "/opt/apache/beam/boot"


def test_the_worker_starts_through_nvidias_entrypoint_then_beams_boot(tmp_path):
    """Run the image's ENTRYPOINT against stand-ins for the two programs.

    NVIDIA's script (NGC images) sets up CUDA forward compatibility, then ``exec "$@"``; Beam's
    boot must run after it, in the environment it prepared, with Dataflow's arguments untouched.
    """
    root = tmp_path / "image"
    stand_ins = {
        NVIDIA_ENTRYPOINT: '#!/bin/sh\nexport LD_LIBRARY_PATH="/usr/local/cuda/compat/lib:$LD_LIBRARY_PATH"\n'
                           'echo nvidia >> "$TRACE"\nexec "$@"\n',
        BEAM_BOOT: '#!/bin/sh\necho "boot $* | $LD_LIBRARY_PATH" >> "$TRACE"\n',
    }
    for path, text in stand_ins.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o755)
    argv = _entrypoint()
    # Every program the entrypoint names is one of the two (mapped into the stand-in root).
    assert set(a for a in argv if a.startswith("/")) <= set(stand_ins), argv
    argv = [str(root / a.lstrip("/")) if a in stand_ins else a for a in argv]
    trace = tmp_path / "trace"
    worker_args = ["--id=sdk-0-0", "--provision_endpoint=localhost:12345", "--logging_endpoint=localhost:1"]
    subprocess.run(argv + worker_args, check=True, env={"PATH": os.environ["PATH"], "TRACE": str(trace)},
                   timeout=30)
    assert trace.read_text().splitlines() == [
        "nvidia", f"boot {' '.join(worker_args)} | /usr/local/cuda/compat/lib:"]


def test_the_image_build_fails_without_nvidias_entrypoint():
    # The entrypoint's first program must exist in the base image; the build checks it rather than
    # leaving a worker that cannot start.
    first = _entrypoint()[0]
    worker = _stages()["worker"]
    check = re.search(rf"^RUN test -x {re.escape(first)} \\\n \|\| \{{ .*exit 1; \}}$", worker, flags=re.M)
    assert check, f"no build-time check that {first} exists"
    assert worker.index(check.group(0)) < worker.index("ENTRYPOINT")


def test_the_worker_image_is_also_the_flex_template_launcher():
    # One image for launcher and workers (docs/scheduling.md says why): the launcher binary from
    # Google's base for our Python version, pointed at the CLI, and Beam's boot still what the entrypoint starts.
    pins = _top_args()
    assert pins["TEMPLATE_LAUNCHER_IMAGE"].startswith(
        "gcr.io/dataflow-templates-base/python" + pins["PYTHON_VERSION"].replace(".", "") + "-template-launcher-base:")
    assert _stages()["template_launcher"].startswith("${TEMPLATE_LAUNCHER_IMAGE} AS template_launcher")
    worker = _stages()["worker"]
    assert re.search(r"^COPY --from=template_launcher /opt/google/dataflow/python_template_launcher "
                     r"/opt/google/dataflow/python_template_launcher$", worker, flags=re.M)
    py_file = re.search(r"^ENV FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)$", worker, flags=re.M).group(1)
    assert py_file == "/opt/beam-tensorrt-images/pipelines/classify_images.py"
    assert (REPO / "pipelines" / "classify_images.py").exists()
    assert re.search(r"^WORKDIR /opt/beam-tensorrt-images$", worker, flags=re.M)
    # A launch in this image may name model files in it by path: the launch check is told it runs in the image.
    from pipelines.launch_checks import IN_IMAGE_VARIABLE

    assert re.search(rf"^\s+{IN_IMAGE_VARIABLE}=1$", worker, flags=re.M), f"the image does not set {IN_IMAGE_VARIABLE}=1"
    # Workers still start Beam's boot (through NVIDIA's entrypoint); the launcher binary is run by
    # Dataflow on the launcher VM, not through the ENTRYPOINT.
    assert _entrypoint()[-1] == BEAM_BOOT
    assert len(re.findall(r"^ENTRYPOINT .*$", DOCKERFILE, flags=re.M)) == 1


def test_python_and_beam_versions_come_from_the_file_the_launcher_reads():
    """pipelines/image_versions.txt is the one place the image's Python and Beam are set: the launch check
    (pipelines/launch_checks.py) reads it at run time, and the build copies it in and fails when the ARGs
    (which FROM lines need before any file can be read) or the installed versions differ from it."""
    from pipelines.launch_checks import IMAGE_VERSIONS_FILE, image_versions

    versions = image_versions()
    pins = _top_args()
    assert (pins["PYTHON_VERSION"], pins["BEAM_VERSION"]) == (versions.python, versions.beam)
    worker = _stages()["worker"]
    relative = IMAGE_VERSIONS_FILE.relative_to(REPO).as_posix()
    copy = re.search(rf"^COPY {re.escape(relative)} (\S+)$", worker, flags=re.M)
    assert copy, f"the worker stage does not COPY {relative}"
    # Read in a RUN step before anything is installed: the ARGs and the base image's Python are checked against it.
    steps = [step for step in _run_steps("worker") if f"open('{copy.group(1)}')" in step]
    assert steps, f"no RUN step reads {copy.group(1)}"
    first_check = steps[0]
    assert "${PYTHON_VERSION}" in first_check and "${BEAM_VERSION}" in first_check
    assert "sys.version_info[:2]" in first_check
    assert worker.index(copy.group(0)) < worker.index(first_check) < worker.index("pip install")
    # After the install, the installed package reads its own copy and Beam's version is checked against it.
    assert re.search(r"from pipelines\.launch_checks import image_versions.*apache_beam\.__version__ == v\.beam",
                     worker, flags=re.S)
    setup = (REPO / "setup.py").read_text()
    assert re.search(r"package_data=\{\"pipelines\": \[[^]]*\"image_versions\.txt\"", setup), \
        "setup.py does not ship pipelines/image_versions.txt with the package (the image installs it with pip)"


#: onnxruntime-gpu on PyPI: the CUDA major its CUDA provider is built for, by release (checked with
#: `pip download --no-deps onnxruntime-gpu==V` and `readelf -d onnxruntime/capi/libonnxruntime_providers_cuda.so`:
#: 1.26.0 needs libcudart.so.12 and libcudnn.so.9; 1.27.0 and later (1.31.1) libcudart.so.13). docs/tensorrt.md.
def _onnxruntime_gpu_cuda_major(version: str) -> int:
    from packaging.version import Version

    return 13 if Version(version) >= Version("1.27") else 12


def test_the_image_runs_onnx_runtime_on_the_gpu_with_one_build_for_its_cuda_major():
    pins = _top_args()
    # The image's CUDA major, as the pins already tie it: cuda-python and DALI are built for it.
    cuda_major = int(pins["CUDA_PYTHON_VERSION"].split(".")[0])
    assert pins["DALI_PACKAGE"] == f"nvidia-dali-cuda{cuda_major}0"
    assert "ONNXRUNTIME_VERSION" not in pins, "the CPU onnxruntime would shadow onnxruntime-gpu (one package only)"
    version = pins["ONNXRUNTIME_GPU_VERSION"]
    assert _onnxruntime_gpu_cuda_major(version) == cuda_major, \
        f"onnxruntime-gpu {version} is built for CUDA {_onnxruntime_gpu_cuda_major(version)}; the image has CUDA {cuda_major}"
    worker = _stages()["worker"]
    constraints = re.search(r"printf '%s\\n' (.*?)> /opt/constraints.txt", DOCKERFILE, flags=re.S).group(1)
    assert '"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' in constraints and '"onnxruntime==' not in constraints
    install = next(step for step in _run_steps("worker") if "pip install" in step and " ." in step)
    assert '"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' in install
    # setup.py asks for onnxruntime (the CPU package, for laptops): the project itself goes in without its
    # dependencies, which are listed here instead, so pip never pulls the CPU build beside the GPU one.
    assert re.search(r"pip install --no-deps \.", worker), "the project's own install would pull the CPU onnxruntime"
    listed = {Requirement(r).name for r in re.findall(r'"([\w\[\]-]+)(?:==\$\{\w+\})?"', install)}
    assert set(_setup_requirements()) - {"onnxruntime"} <= listed | {"onnxruntime-gpu"}, listed
    # The build proves it: one onnxruntime, with the CUDA provider, whose libraries all resolve in this image.
    assert re.search(r"pip show onnxruntime\b.*&& exit 1", install, flags=re.S) or \
        re.search(r"! python3 -m pip show onnxruntime ", worker)
    assert "CUDAExecutionProvider" in worker and "libonnxruntime_providers_cuda.so" in worker and "ldd" in worker


def test_the_image_keeps_out_what_beam_imports_at_every_start_and_the_build_checks_it(tmp_path):
    from benchmarks.gpu import NOT_IN_WORKER_IMAGE, hidden_packages

    install = next(step for step in _run_steps("worker") if "pip install" in step and " ." in step)
    lines = install.splitlines()
    where = {what: next(i for i, line in enumerate(lines) if what in line)
             for what in ("pip install --no-deps .", "pip uninstall", 'heavy="$(')}
    # Removed after everything is installed (an install could bring them back), then checked.
    assert where["pip install --no-deps ."] < where["pip uninstall"] < where['heavy="$(']
    removed = re.search(r"pip uninstall -y -q ([\w ]+?) \|\| true", lines[where["pip uninstall"]]).group(1).split()
    assert sorted(removed) == sorted(NOT_IN_WORKER_IMAGE), "the image and the GPU benchmarks' --hide must agree"
    check = re.search(r'heavy="\$\(python3 -c "(.*?)"\)"', install).group(1)
    assert sorted(re.search(r"\{(.*?)\} &", check).group(1).replace("'", "").split(", ")) == sorted(NOT_IN_WORKER_IMAGE)
    # The build's own lines, from the check to its verdict, run here by sh as the RUN step runs them.
    end = next(i for i in range(where['heavy="$('], len(lines)) if '"$heavy"' in lines[i])
    steps = [re.sub(r"^\s*&& |\s*\\$", "", line) for line in lines[where['heavy="$(']:end + 1]]
    (tmp_path / "bin").mkdir()
    python3 = tmp_path / "bin" / "python3"  # this environment's Python, by the name the build calls it
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)

    def build_step(*stand_ins):
        """sh's exit status and error output for the check, with the named packages importable as empty stand-ins
        and the rest of NOT_IN_WORKER_IMAGE hidden (whatever this environment has), as in an image without them."""
        folder = tmp_path / "-".join(stand_ins or ("none",))
        hidden_packages(str(folder), [n for n in NOT_IN_WORKER_IMAGE if n not in stand_ins])
        for name in stand_ins:
            (folder / name).mkdir(parents=True, exist_ok=True)
            (folder / name / "__init__.py").write_text("")
        env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
                   PYTHONPATH=os.pathsep.join([str(folder), str(folder / "hidden_packages"), str(REPO)]))
        run = subprocess.run(["sh", "-c", " && ".join(steps) + " && echo passed"], env=env, capture_output=True,
                             text=True, cwd=REPO)
        return run.returncode, run.stdout + run.stderr

    code, out = build_step()
    assert code == 0 and "passed" in out, out
    for name in NOT_IN_WORKER_IMAGE:
        # Beam imports it at start: the build stops, with the message (torch) or on Beam's own use of the
        # empty stand-in (pandas, whose attributes Beam reads as it loads).
        code, out = build_step(name)
        assert code != 0 and "passed" not in out, (name, out)
    assert "starting a job imports torch" in build_step("torch")[1]
