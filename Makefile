# xenpage: `make demo` and `make test` set everything up by themselves on a fresh machine.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: venv demo test test-fast bench soak test-xen lab-build clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xenpage demo

test: $(STAMP)
	$(VPY) -m pytest -q -n $(PYTEST_WORKERS) tests

test-fast: $(STAMP)
	$(VPY) -m pytest -q -x tests -m "not slow"

bench: $(STAMP)
	$(VPY) bench/run.py

soak: $(STAMP)
	$(VPY) bench/soak.py

test-xen: $(STAMP)
	$(PY) lab/xenlab.py test

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
