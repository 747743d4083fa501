# The two commands a newcomer runs (see README.md).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test test-fast test-gpu lint bench

install:
	$(PIP) install -q -e ".[test]"

# The main job on the bundled tiny default.
demo: install
	$(PYTHON) -m launcher.demo

# The whole suite: unit, distributed (spawned gloo ranks) and end-to-end tests.
test: install
	$(PYTHON) -m pytest -q tests

# Everything but the slow end-to-end tests.
test-fast: install
	$(PYTHON) -m pytest -q -m "not slow" tests

# The GPU tier (tests/gpu): bf16 parity with transformers, FlexAttention vs SDPA, an 8B-width train step,
# NCCL, cached sampling on CUDA. Run it on a CUDA machine; without CUDA every test is skipped with the reason.
test-gpu: install
	$(PYTHON) -m pytest -q -m gpu tests/gpu

# Layering contracts (pyproject.toml [tool.importlinter]) and ruff lint + format check; CI runs it before the tests.
lint: install
	lint-imports
	ruff check .
	ruff format --check .

bench: install
	$(PYTHON) benchmarks/bench_routing.py
