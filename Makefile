# Every target runs inside one virtual environment ($(VENV)); `make setup` creates it.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/csm-1b

.PHONY: setup test run serve tiny bench weights image deploy-dry-run

$(VENV)/.installed: requirements.txt requirements-nodeps.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

# Runs the worker once on test_input.json against $(MODEL_DIR) (real weights: `make weights`).
run: setup
	CSM_MODEL_DIR=$(MODEL_DIR) $(PY) -u handler.py

serve: setup
	CSM_MODEL_DIR=$(MODEL_DIR) $(PY) -u handler.py --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port 8000

# A model folder with random weights (noise, not speech) for trying the worker without the real model.
tiny: setup
	$(PY) -m csm.testing make-tiny models/tiny-random
