# Every target runs inside one virtual environment ($(VENV)); `make setup` creates it.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/csm-1b

.PHONY: setup test run serve serve-http tiny bench weights image image-slim deploy-dry-run gpu-check gpu-wheels

$(VENV)/.installed: requirements.txt requirements-nodeps.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

setup: $(VENV)/.installed

# The venv's bin first on PATH, as if activated: tests call its tools (hadolint). One pytest
# process per core, each given whole files, so that a file's module fixtures (a server, the
# GPU suite's CPU run) are built once.
test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -n auto --dist loadfile

# Runs the worker once on test_input.json against $(MODEL_DIR) (real weights: `make weights`).
run: setup
	CSM_MODEL_DIR=$(MODEL_DIR) $(PY) -u handler.py

# Without a model folder it downloads one first when HF_TOKEN is set, else says how to get one.
serve: setup
	CSM_MODEL_DIR=$(MODEL_DIR) $(PY) -u handler.py --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port 8000

# The HTTP mode (OpenAI-compatible speech API, native JSON API, WebSocket) on
# http://127.0.0.1:8000, as a RunPod load-balancing endpoint runs it.
serve-http: setup
	CSM_MODEL_DIR=$(MODEL_DIR) CSM_MODE=http CSM_HOST=127.0.0.1 PORT=8000 $(PY) -u handler.py

# A model folder with random weights (noise, not speech) for trying the worker without the real model.
tiny: setup
	$(PY) -m csm.testing make-tiny models/tiny-random

# Everything only a GPU shows, in one command (BENCHMARKS.md, "The GPU suite"): csm-1b shapes
# on a CUDA machine, under 8 minutes on one H100; GPU_SUITE_FLAGS=--cpu runs the CPU mode. No
# `setup` here: a lent GPU machine may have its own torch and no registry (PYTHON=python3,
# with the project's other wheels on PYTHONPATH).
PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_SUITE_OUT ?= gpu-suite-report
GPU_SUITE_FLAGS ?=
gpu-check:
	$(PYTHON) -m bench.gpu_suite --out $(GPU_SUITE_OUT) $(GPU_SUITE_FLAGS)

# The wheels gpu-check needs on a lent GPU machine that has no registry, fetched here into .whl/
# (bench/gpu_suite/wheels.sh; carry .whl there).
gpu-wheels:
	bash bench/gpu_suite/wheels.sh .whl

# The real model folder (gated: accept the license at https://huggingface.co/sesame/csm-1b and
# export HF_TOKEN), with the CSM weights converted to bfloat16 as in the image.
weights: setup
	$(PY) -m builder.fetch_weights --dest $(MODEL_DIR) --dtype bfloat16

# The worker image, weights baked in (fails without HF_TOKEN, which goes in as a BuildKit secret,
# never a build arg). BUILD_FLAGS=--push (with IMAGE=registry/name:tag) publishes instead of
# loading locally. `make image-slim`: the same Dockerfile without the gated CSM weights (no token
# needed); the worker then takes them from a RunPod cached model, a volume or a download at start.
IMAGE ?= csm-runpod-worker:dev
SLIM_IMAGE ?= csm-runpod-worker:dev-slim
BUILD_FLAGS ?= --load
image:
	docker buildx build --secret id=HF_TOKEN,env=HF_TOKEN --build-arg CSM_WEIGHTS=fetch -t $(IMAGE) $(BUILD_FLAGS) .

image-slim:
	docker buildx build --build-arg CSM_WEIGHTS=skip -t $(SLIM_IMAGE) $(BUILD_FLAGS) .

# The RunPod template and endpoint runpod.yaml describes: shown, or created (needs RUNPOD_API_KEY).
# CONFIG=runpod.http.yaml: the load-balancing endpoint (HTTP mode) instead of the queue one.
CONFIG ?= runpod.yaml
deploy-dry-run: setup
	$(PY) -m builder.deploy --config $(CONFIG) --dry-run

.PHONY: deploy
deploy: setup
	$(PY) -m builder.deploy --config $(CONFIG)
