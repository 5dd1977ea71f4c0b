# The two set-up commands: `make demo` and `make test`. Each creates .venv from nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench image clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## the real job end to end against an embedded local S3 server
	$(BIN)/python scripts/demo.py

test: $(STAMP)  ## the whole suite (Docker tests run as root or under CI=true)
	$(BIN)/python -m pytest

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/python -m pytest -m "not e2e and not docker"

lint: $(STAMP)
	$(BIN)/hadolint Dockerfile

bench: $(STAMP)  ## benchmarks; results go to docs/benchmarks.md
	$(BIN)/python benchmarks/run_all.py

image:
	docker build -t trainjob:$$($(BIN)/python -c 'import trainjob; print(trainjob.__version__)') .

clean:
	rm -rf $(VENV) .demo .pytest_cache build dist src/*.egg-info
