# chmig — make targets.  `make demo` and `make test` are the two commands a newcomer runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test bench demo selfcheck guest docs clean fuzz

# One command on a fresh machine: a venv with chmig (editable) and the test tools.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -ra $(PYTEST_ARGS)

bench: install
	$(PY) bench/run_all.py

demo: install
	$(PY) -m chmig demo

# The hostile-peer fuzzers (fuzz/): the migration wire and the API socket; CASES cases, SEED seed.
CASES ?= 1000
SEED  ?= 1
fuzz: install
	$(PY) -m fuzz --cases $(CASES) --seed $(SEED)

selfcheck: install
	$(PY) -m chmig selfcheck

# Rebuild the guest program from its assembler source (the binary is committed).
guest:
	sh chmig/guest/build.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

docs:
	$(PYTHON) -m chmig.docs docs/protocol.md
