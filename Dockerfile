# Dataflow / Beam worker image with TensorRT: NVIDIA's TensorRT image + this project + Beam's SDK harness.
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/beam-tensorrt:latest .
#   docker build --target test -t beam-tensorrt-test .     # + CuPy, for tests/gpu (docs/tensorrt.md)
#
# The same image is the Dataflow Flex Template launcher (docs/scheduling.md, `make flex-template`):
# Google's launcher binary is copied in and pointed at pipelines/classify_images.py, and the
# ENTRYPOINT still starts Beam's boot (after NVIDIA's) for the workers. One image, not a launcher stage of its own, so the
# launcher builds and pickles the pipeline with exactly the Beam, Python and project code the GPU
# workers unpickle it with; the price is a launcher VM pulling the large image (a few minutes per launch).
#
# Every version is pinned here, in one place, except Python and Beam: those are set in
# pipelines/image_versions.txt, which the launcher also reads to check its own (a launch must use the
# image's Beam and Python). PYTHON_VERSION and BEAM_VERSION below repeat them only because FROM lines
# need them before any file can be read; the first build step fails when they differ from the file.
# The TensorRT base image fixes TensorRT, CUDA and Python together (see NVIDIA's TensorRT container
# release notes); Beam's SDK image must be for the same Python minor version, and apache-beam here
# must equal BEAM_VERSION. A plan (.plan) runs only with the TensorRT version that built it: build
# plans inside this image (docs/tensorrt.md).
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:25.06-py3
# Google's Flex Template launcher for the same Python minor version as PYTHON_VERSION (pin a digest
# in production: the tag moves).
ARG TEMPLATE_LAUNCHER_IMAGE=gcr.io/dataflow-templates-base/python312-template-launcher-base:latest
ARG PYTHON_VERSION=3.12
ARG BEAM_VERSION=2.77.0
# cuda-python must match the image's CUDA major (12 for the 25.0x images); onnxconverter-common is
# only used for fp16 builds on TensorRT 11.x.
ARG CUDA_PYTHON_VERSION=12.9.0
ARG ONNXCONVERTER_COMMON_VERSION=1.16.0
ARG PYTEST_VERSION=8.4.1
ARG SCIKIT_IMAGE_VERSION=0.25.2
# The project's own dependencies (setup.py gives ranges only). numpy is pinned to the version the
# base image ships, because NVIDIA's TensorRT bindings are built against it: pip must never upgrade
# it (the build fails instead if a pin below needs another numpy). NUMPY_VERSION=image means that.
ARG NUMPY_VERSION=image
ARG ONNX_VERSION=1.23.2
# onnx's ml_dtypes: 0.7.0 takes ~0.6 s to import (setup.py). 0.5.4 takes numpy 1.26 or 2 (0.6.0 needs numpy 2),
# so it fits whichever numpy the base image ships.
ARG ML_DTYPES_VERSION=0.5.4
# ONNX Runtime with its CUDA and TensorRT providers (--providers cuda), built for the image's CUDA
# major: onnxruntime-gpu on PyPI is built for CUDA 12 up to 1.26.0 and for CUDA 13 from 1.27.0
# (docs/tensorrt.md), and the 25.0x images have CUDA 12. The CPU package onnxruntime is not
# installed beside it: both install the module onnxruntime, and whichever comes last wins.
ARG ONNXRUNTIME_GPU_VERSION=1.26.0
ARG PILLOW_VERSION=12.3.0
# The JSON Lines sink's encoder (apache-beam[gcp] requires it too, >=3.9.7,<4).
ARG ORJSON_VERSION=3.13.0
ARG PYARROW_VERSION=25.0.1
# GPU decode (--decode gpu): NVIDIA DALI built for the image's CUDA major (12 for the 25.0x images).
ARG DALI_PACKAGE=nvidia-dali-cuda120
ARG DALI_VERSION=2.4.0
# Only in the test stage: tests/gpu/test_cuda_machinery.py uses a CuPy kernel (CUDA 12 wheels).
ARG CUPY_VERSION=14.2.0

FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION} AS beam_sdk

FROM ${TEMPLATE_LAUNCHER_IMAGE} AS template_launcher

FROM ${TENSORRT_IMAGE} AS worker
ARG PYTHON_VERSION
ARG BEAM_VERSION
ARG CUDA_PYTHON_VERSION
ARG ONNXCONVERTER_COMMON_VERSION
ARG PYTEST_VERSION
ARG SCIKIT_IMAGE_VERSION
ARG NUMPY_VERSION
ARG ONNX_VERSION
ARG ML_DTYPES_VERSION
ARG ONNXRUNTIME_GPU_VERSION
ARG PILLOW_VERSION
ARG ORJSON_VERSION
ARG PYARROW_VERSION
ARG DALI_PACKAGE
ARG DALI_VERSION

# Install into the image's Python (Ubuntu's PEP 668 marker would refuse otherwise), and let the Beam
# worker use that environment instead of making a fresh virtualenv at start-up (Beam >= 2.48).
# BEAM_TENSORRT_WORKER_IMAGE tells a launch in this image (the Flex Template launcher) that a model
# file it names by path is in the image the workers run too (pipelines/launch_checks.py).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1 \
    BEAM_TENSORRT_WORKER_IMAGE=1

# Fail the build now, not on a worker, if the ARGs or the base image are not what the pins say.
COPY pipelines/image_versions.txt /opt/image_versions.txt
RUN python3 -c "import sys, tensorrt; \
pins = dict(l.strip().split('=', 1) for l in open('/opt/image_versions.txt') if '=' in l and not l.lstrip().startswith('#')); \
assert (pins['PYTHON_VERSION'], pins['BEAM_VERSION']) == ('${PYTHON_VERSION}', '${BEAM_VERSION}'), \
    'Dockerfile ARGs PYTHON_VERSION=${PYTHON_VERSION} BEAM_VERSION=${BEAM_VERSION} differ from pipelines/image_versions.txt %s' % pins; \
want = tuple(int(x) for x in pins['PYTHON_VERSION'].split('.')); \
assert sys.version_info[:2] == want, 'base image has Python %s, pipelines/image_versions.txt says %s' % (sys.version, pins['PYTHON_VERSION']); \
assert tensorrt.__version__.split('.')[0] in ('10', '11'), 'unsupported TensorRT ' + tensorrt.__version__; \
print('python', sys.version.split()[0], 'tensorrt', tensorrt.__version__)"
# Beam's boot program runs `python` and `pip`.
RUN command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python; \
    command -v pip >/dev/null || ln -s "$(command -v pip3)" /usr/local/bin/pip

WORKDIR /opt/beam-tensorrt-images
COPY setup.py README.md pytest.ini ./
COPY engines engines
COPY images images
COPY model_tools model_tools
COPY transforms transforms
COPY pipelines pipelines
COPY benchmarks benchmarks
COPY tests tests
# Every pin above goes into one constraints file that applies to `.` and all its dependencies.
RUN numpy_version="${NUMPY_VERSION}"; \
    if [ "$numpy_version" = image ]; then \
        numpy_version="$(python3 -c 'import numpy; print(numpy.__version__)')" \
        || { echo "the base image has no numpy: set --build-arg NUMPY_VERSION=X.Y.Z" >&2; exit 1; }; \
    fi; \
    printf '%s\n' "numpy==${numpy_version}" "onnx==${ONNX_VERSION}" "ml_dtypes==${ML_DTYPES_VERSION}" \
        "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
        "pillow==${PILLOW_VERSION}" "pyarrow==${PYARROW_VERSION}" "orjson==${ORJSON_VERSION}" \
        "apache-beam==${BEAM_VERSION}" \
        "cuda-python==${CUDA_PYTHON_VERSION}" "onnxconverter-common==${ONNXCONVERTER_COMMON_VERSION}" \
        "pytest==${PYTEST_VERSION}" "scikit-image==${SCIKIT_IMAGE_VERSION}" \
        "${DALI_PACKAGE}==${DALI_VERSION}" > /opt/constraints.txt \
 && cat /opt/constraints.txt
ENV PIP_CONSTRAINT=/opt/constraints.txt
# setup.py's dependencies, with onnxruntime-gpu for the CPU onnxruntime it names (what a laptop
# installs), then the project itself without dependencies, so that pip never pulls the CPU build.
# The build then proves there is one onnxruntime, that it has the CUDA provider, and that every
# library that provider links is in this image (libcuda.so.1 comes from the host's driver).
# Beam imports torch (RunInference) and pandas (its type hints) at every start when they are importable,
# 3.4 s and 1.3 s of a job's start on H100 hosts (benchmarks/NOTES.md): the image has neither, and the
# build proves a job starts without them.
RUN python3 -m pip install \
        "apache-beam[gcp]==${BEAM_VERSION}" \
        "numpy" \
        "onnx==${ONNX_VERSION}" \
        "ml_dtypes==${ML_DTYPES_VERSION}" \
        "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
        "pillow==${PILLOW_VERSION}" \
        "orjson==${ORJSON_VERSION}" \
        "pyarrow==${PYARROW_VERSION}" \
        "cuda-python==${CUDA_PYTHON_VERSION}" \
        "onnxconverter-common==${ONNXCONVERTER_COMMON_VERSION}" \
        "pytest==${PYTEST_VERSION}" \
        "scikit-image==${SCIKIT_IMAGE_VERSION}" \
        "${DALI_PACKAGE}==${DALI_VERSION}" \
 && python3 -m pip install --no-deps . \
 && { ! python3 -m pip show onnxruntime >/dev/null 2>&1 \
      || { echo "the CPU onnxruntime was installed beside onnxruntime-gpu: find what pulls it (pip show -v)" >&2; exit 1; }; } \
 && provider="$(python3 -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime_providers_cuda.so"))')" \
 && missing="$(ldd "$provider" | grep 'not found' | grep -v 'libcuda\.so\.1' || true)" \
 && { [ -z "$missing" ] || { echo "onnxruntime-gpu ${ONNXRUNTIME_GPU_VERSION}'s CUDA provider links libraries this image lacks (built for another CUDA major?): $missing" >&2; exit 1; }; } \
 && { python3 -m pip uninstall -y -q torch pandas || true; } \
 && heavy="$(python3 -c "import sys, pipelines.classify_images; print(' '.join(sorted({'torch', 'pandas'} & set(sys.modules))))")" \
 && { [ -z "$heavy" ] || { echo "starting a job imports $heavy, which Beam loads at every start when it can (seconds of each worker's start): keep it out of this image" >&2; exit 1; }; } \
 && python3 -c "import apache_beam, sys, tensorrt, nvidia.dali, onnxruntime, engines.tensorrt, images.dali_decoder, engines.tensorrt.recipe, pipelines.classify_images; \
assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers(), onnxruntime.get_available_providers(); \
from engines import cuda; cuda.cudart(); \
assert apache_beam.__version__ == '${BEAM_VERSION}', apache_beam.__version__; \
from pipelines.launch_checks import image_versions; v = image_versions(); \
assert apache_beam.__version__ == v.beam and '%d.%d' % sys.version_info[:2] == v.python, (v, apache_beam.__version__); \
import numpy; print('apache-beam', apache_beam.__version__, 'tensorrt', tensorrt.__version__, 'numpy', numpy.__version__)"

# The SDK harness of the matching Beam release; the image starts as a Beam worker, through NVIDIA's
# entrypoint first: in NGC images it sets up CUDA forward compatibility (the image's compat libcuda
# when the host driver is older than the image's CUDA), which on a Dataflow driver older than the
# image's CUDA is the difference between running and "CUDA driver version is insufficient". It ends
# with `exec "$@"`, so Beam's boot runs next with Dataflow's arguments (docs/tensorrt.md).
COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam
RUN test -x /opt/nvidia/nvidia_entrypoint.sh \
 || { echo "the base image has no /opt/nvidia/nvidia_entrypoint.sh: use an NGC TensorRT image" >&2; exit 1; }
# The Flex Template launcher runs this file with the template's parameters as flags; the project is
# installed above, so no setup file or requirements are staged at launch.
COPY --from=template_launcher /opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher
ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/opt/beam-tensorrt-images/pipelines/classify_images.py
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/opt/apache/beam/boot"]

# The worker plus CuPy, for `pytest -m "gpu or cuda" tests/gpu` (build with --target test).
FROM worker AS test
ARG CUPY_VERSION
RUN python3 -m pip install "cupy-cuda12x==${CUPY_VERSION}" \
 && python3 -c "import cupy; print('cupy', cupy.__version__)"

# The default target (`docker build .`) is the worker image, without CuPy.
FROM worker
