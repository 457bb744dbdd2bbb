"""beam-tensorrt-images: score large image collections on Apache Beam with TensorRT or ONNX Runtime."""

from setuptools import find_packages, setup

# Versions are pinned in one place for the container too (see Dockerfile).
BEAM = "apache-beam[gcp]>=2.60,<3"

setup(
    name="beam-tensorrt-images",
    version="0.1.0",
    description="Apache Beam batch image classification with TensorRT and ONNX Runtime engines",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["engines", "engines.*", "images", "images.*", "model_tools", "model_tools.*",
                                    "transforms", "transforms.*", "pipelines", "pipelines.*", "benchmarks",
                                    "benchmarks.*"]),
    # The worker image's Python and Beam versions, read by the launch check (pipelines/launch_checks.py).
    package_data={"pipelines": ["image_versions.txt"]},
    install_requires=[
        BEAM,
        "numpy>=1.24",
        "pillow>=10.1",
        "onnx>=1.15",
        # onnx imports it at its own import; 0.7.0 spends ~0.6 s of that registering its numpy types
        # (benchmarks/NOTES.md, "ml_dtypes"), on every job's launch and in every worker that loads a model.
        "ml_dtypes<0.7",
        "onnxruntime>=1.17",
        # The JSON Lines sink's encoder; apache-beam[gcp] already requires it in this range.
        "orjson>=3.9.7,<4",
        "pyarrow>=14",
    ],
    extras_require={
        # Exporting the default model needs torch: requirements-export.txt, in a venv of its own
        # (`make model`), so that no environment that runs jobs has torch (Beam imports it if it can).
        # TensorRT itself comes with NVIDIA's image (see Dockerfile) or NVIDIA's package index;
        # listing it here would pull a second copy into that image. These are its companions.
        "tensorrt": ["cuda-python>=12.4", "onnxconverter-common>=1.14"],
        # GPU decode (--decode gpu): NVIDIA DALI for the environment's CUDA major, and ONNX Runtime's
        # CUDA provider. `gpu` is CUDA 13 (driver r580+), `gpu-cuda12` CUDA 12. onnxruntime-gpu on PyPI
        # is built for CUDA 12 up to 1.26 and for CUDA 13 from 1.27 (docs/tensorrt.md). Either replaces
        # the CPU onnxruntime: uninstall that first (both install the module onnxruntime).
        # onnxconverter-common: --precision fp16 converts the model where it loads.
        "gpu": ["nvidia-dali-cuda130>=2.4", "onnxruntime-gpu>=1.27", "cuda-python>=13", "onnxconverter-common>=1.14"],
        "gpu-cuda12": ["nvidia-dali-cuda120>=2.4", "onnxruntime-gpu>=1.20,<1.27", "cuda-python>=12.4,<13",
                       "onnxconverter-common>=1.14"],
        "demo": ["scikit-image>=0.22"],
        "test": [
            "pytest>=7",
            "scikit-image>=0.22",
            "gcp-storage-emulator>=2024.0",
            "tensorrt-lean-cu13==11.4.0.106",
            "onnxconverter-common>=1.14",
            # Real CUDA bindings (no GPU needed to import) so CI checks the "no GPU" error path.
            "cuda-python>=13",
            "nvidia-cuda-runtime>=13",
            # The DALI graph runs on the CPU in CI (--decode dali_cpu): pre-screen, routing, fallback.
            "nvidia-dali-cuda130>=2.4",
        ],
        "benchmark": ["scikit-image>=0.22", "pyinstrument>=4", "py-spy>=0.4"],
    },
)
