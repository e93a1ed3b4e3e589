# `make demo` and `make test` set everything up on a fresh machine (a venv in .venv) and run.
PYTHON := $(shell .ci/find-python)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "no Python 3.12/3.13 found" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/turbojax generate --out out/demo

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q

clean:
	rm -rf $(VENV) out
