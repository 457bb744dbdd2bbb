# Two commands do all set-up on a fresh machine:  make demo   and   make test
PYTHON ?= python3
# .venv runs jobs, the demo, tests and benchmarks; it has no torch, because Beam's RunInference imports
# torch whenever it is importable (~2 s of every job's start on 2 cores).
VENV ?= .venv
PY := $(VENV)/bin/python
# .venv-export only exports the default model (`make model`): torch and the model packages.
EXPORT_VENV ?= .venv-export
EXPORT_PY := $(EXPORT_VENV)/bin/python
# Pinned so pip reuses a local wheel where one exists.
TORCH ?= torch==2.13.0
# .venv-bq runs the tests' BigQuery emulator (tests/bq_emulator.py, requirements-bq.txt): Python >= 3.11.
BQ_VENV ?= .venv-bq
BQ_PYTHON ?= $(PYTHON)
MODEL := models/efficientnet_lite0.onnx
MODEL_NCHW := models/efficientnet_lite0_float32_nchw.onnx
# The same network exported as docs/own-model.md shows users (torch's default exporter), for the tests.
MODEL_TORCH_EXPORT := models/efficientnet_lite0_torch_export.onnx

.PHONY: venv model demo test test-gpu test-all benchmark clean flex-template

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[demo,test,benchmark]"
	touch $@

$(EXPORT_VENV)/.installed: requirements-export.txt
	$(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_PY) -m pip install -q --upgrade pip
	$(EXPORT_PY) -m pip install -q "$(TORCH)" -r requirements-export.txt
	touch $@

$(BQ_VENV)/.installed: requirements-bq.txt tests/bq_emulator.py
	$(BQ_PYTHON) -m venv $(BQ_VENV)
	$(BQ_VENV)/bin/python -m pip install -q --upgrade pip
	$(BQ_VENV)/bin/python -m pip install -q -r requirements-bq.txt
	$(BQ_VENV)/bin/python -m tests.bq_emulator place-extensions
	touch $@

model: $(MODEL)

$(MODEL): $(EXPORT_VENV)/.installed model_tools/export_efficientnet.py
	$(EXPORT_PY) -m model_tools.export_efficientnet --output $@

$(MODEL_NCHW): $(EXPORT_VENV)/.installed model_tools/export_efficientnet.py
	$(EXPORT_PY) -m model_tools.export_efficientnet --layout float32_nchw --output $@

$(MODEL_TORCH_EXPORT): $(EXPORT_VENV)/.installed model_tools/export_efficientnet.py tests/torch_export.py
	$(EXPORT_PY) -m tests.torch_export --output $@

demo: $(VENV)/.installed $(MODEL)
	$(PY) -m pipelines.demo --output demo_output

# Tests marked gpu or cuda (tests/gpu) need an NVIDIA GPU: they are the GPU lane, `make test-gpu`, which
# .ci/run adds where `nvidia-smi -L` finds one; on a GPU machine each test runs in exactly one lane.
GPU_MARKERS := gpu or cuda

test: $(VENV)/.installed $(MODEL) $(MODEL_NCHW) $(BQ_VENV)/.installed $(MODEL_TORCH_EXPORT)
	$(PY) -m pytest -q -m "not ($(GPU_MARKERS))"

# With .venv the tests that need the full TensorRT or CuPy skip, naming what is missing; inside the image
# built from Dockerfile (--target test) they all run: docs/tensorrt.md has that docker command.
test-gpu: $(VENV)/.installed $(MODEL) $(MODEL_NCHW)
	$(PY) -m pytest -q -m "$(GPU_MARKERS)"

benchmark: $(VENV)/.installed $(MODEL) $(MODEL_NCHW)
	$(PY) -m benchmarks.throughput --images 2000

clean:
	rm -rf $(VENV) $(EXPORT_VENV) $(BQ_VENV) models demo_output demo_images benchmark_output

# Prints the Flex Template build command (docs/scheduling.md); run what it prints, or `make flex-template | sh`.
# IMAGE is the image built from Dockerfile and pushed; TEMPLATE the gs:// path of the template spec.
IMAGE ?= REGION-docker.pkg.dev/PROJECT/REPO/beam-tensorrt:latest
TEMPLATE ?= gs://BUCKET/templates/classify_images.json
flex-template:
	@echo gcloud dataflow flex-template build $(TEMPLATE) \\
	@echo "    --image $(IMAGE) --sdk-language PYTHON --metadata-file flex/metadata.json"
