# Two commands on a fresh clone: `make demo` and `make test`. Each bootstraps .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test zoo bench lint install clean

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/graphprune prune

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15

zoo: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m zoo --durations=25

bench: $(STAMP)
	$(PY) bench/speed.py

lint: $(STAMP)
	$(PY) -m ruff check graphprune models tests examples bench

clean:
	rm -rf $(VENV) out .pytest_cache
