# Every target runs inside one virtual environment ($(VENV)); `make setup` creates it.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/csm-1b

.PHONY: setup test run serve serve-http tiny bench weights image deploy-dry-run

$(VENV)/.installed: requirements.txt requirements-nodeps.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

setup: $(VENV)/.installed

# The venv's bin first on PATH, as if activated: tests call its tools (hadolint).
test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

# Runs the worker once on test_input.json against $(MODEL_DIR) (real weights: `make weights`).
run: setup
	CSM_MODEL_DIR=$(MODEL_DIR) $(PY) -u handler.py

serve: setup
	CSM_MODEL_DIR=$(MODEL_DIR) $(PY) -u handler.py --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port 8000

# The HTTP mode (OpenAI-compatible speech API, native JSON API, WebSocket) on
# http://127.0.0.1:8000, as a RunPod load-balancing endpoint runs it.
serve-http: setup
	CSM_MODEL_DIR=$(MODEL_DIR) CSM_MODE=http CSM_HOST=127.0.0.1 PORT=8000 $(PY) -u handler.py

# A model folder with random weights (noise, not speech) for trying the worker without the real model.
tiny: setup
	$(PY) -m csm.testing make-tiny models/tiny-random

# The real model folder (gated: accept the license at https://huggingface.co/sesame/csm-1b and
# export HF_TOKEN), with the CSM weights converted to bfloat16 as in the image.
weights: setup
	$(PY) -m builder.fetch_weights --dest $(MODEL_DIR) --dtype bfloat16

# The worker image, weights baked in. HF_TOKEN goes in as a BuildKit secret, never a build arg.
# BUILD_FLAGS=--push (with IMAGE=registry/name:tag) publishes instead of loading locally.
IMAGE ?= csm-runpod-worker:dev
BUILD_FLAGS ?= --load
image:
	docker buildx build --secret id=HF_TOKEN,env=HF_TOKEN -t $(IMAGE) $(BUILD_FLAGS) .

# The RunPod template and endpoint runpod.yaml describes: shown, or created (needs RUNPOD_API_KEY).
# CONFIG=runpod.http.yaml: the load-balancing endpoint (HTTP mode) instead of the queue one.
CONFIG ?= runpod.yaml
deploy-dry-run: setup
	$(PY) -m builder.deploy --config $(CONFIG) --dry-run

.PHONY: deploy
deploy: setup
	$(PY) -m builder.deploy --config $(CONFIG)
