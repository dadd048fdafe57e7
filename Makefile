# fedvision — one environment in .venv, created on demand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast demo demo-quick bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# demo-output holds only what the last demo wrote (fedvision demo refuses to write over a run): start afresh.
demo: install
	rm -rf demo-output
	$(VENV)/bin/fedvision demo --out demo-output

demo-quick: install
	rm -rf demo-output
	$(VENV)/bin/fedvision demo --quick --out demo-output

bench: install
	$(PY) benchmarks/dp_overhead.py
	$(PY) benchmarks/secure_noise.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
