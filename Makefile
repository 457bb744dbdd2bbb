# Two commands do all set-up on a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch only prepares the model (export extra); pin it so pip reuses a local wheel where one exists.
TORCH ?= torch==2.13.0
MODEL := models/efficientnet_lite0.onnx
MODEL_NCHW := models/efficientnet_lite0_float32_nchw.onnx

.PHONY: venv model demo test test-all benchmark clean flex-template

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[export,demo,test,benchmark]"
	touch $@

model: $(MODEL)

$(MODEL): $(VENV)/.installed engines/export_efficientnet.py
	$(PY) -m engines.export_efficientnet --output $@

$(MODEL_NCHW): $(VENV)/.installed engines/export_efficientnet.py
	$(PY) -m engines.export_efficientnet --layout float32_nchw --output $@

demo: $(MODEL)
	$(PY) -m pipelines.demo --output demo_output

test: $(MODEL) $(MODEL_NCHW)
	$(PY) -m pytest -q

benchmark: $(MODEL) $(MODEL_NCHW)
	$(PY) -m benchmarks.throughput --images 2000

clean:
	rm -rf $(VENV) models demo_output demo_images benchmark_output

# Prints the Flex Template build command (docs/scheduling.md); run what it prints, or `make flex-template | sh`.
# IMAGE is the image built from Dockerfile and pushed; TEMPLATE the gs:// path of the template spec.
IMAGE ?= REGION-docker.pkg.dev/PROJECT/REPO/beam-tensorrt:latest
TEMPLATE ?= gs://BUCKET/templates/classify_images.json
flex-template:
	@echo gcloud dataflow flex-template build $(TEMPLATE) \\
	@echo "    --image $(IMAGE) --sdk-language PYTHON --metadata-file flex/metadata.json"
