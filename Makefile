# The two commands a newcomer runs (see README.md).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test test-fast lint bench

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

# Layering contracts (pyproject.toml [tool.importlinter]) and ruff lint + format check; CI runs it before the tests.
lint: install
	lint-imports
	ruff check .
	ruff format --check .

bench: install
	$(PYTHON) benchmarks/bench_routing.py
