# chmig — make targets.  `make demo` and `make test` are the two commands a newcomer runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test bench demo selfcheck guest docs traces clean fuzz

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

# Redraw what docs/protocol.md draws from protocol.py's tables and from the committed traces (no KVM needed).
docs: install
	$(PY) -m chmig.docs docs/protocol.md

# Record docs/traces/ anew from real runs of every `chmig walkthrough` (KVM, userfaultfd), then redraw.
traces: install
	$(PY) -m chmig.docs --record docs/protocol.md
