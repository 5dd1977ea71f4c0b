# The two set-up commands: `make demo` and `make test`. Each creates .venv from nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench image image-cpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## the real job end to end against an embedded local S3 server
	$(BIN)/python scripts/demo.py

# Three workers on two cores: many end-to-end tests wait (on the store, a paced step, an
# outage), and a third worker fills those waits (docs/testing.md has the measurement). The
# Docker tests stay together on one worker (xdist_group), which builds the image once.
XDIST := -n 3 --dist loadgroup

test: $(STAMP)  ## the whole suite (Docker tests run as root or under CI=true)
	$(BIN)/python -m pytest $(XDIST)

test-fast: $(STAMP)  ## unit tests only: no subprocess run, no container, no training
	$(BIN)/python -m pytest $(XDIST) -m "not e2e and not docker and not training"

lint: $(STAMP)
	$(BIN)/hadolint Dockerfile

bench: $(STAMP)  ## benchmarks; results go to docs/benchmarks.md
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py

image:
	docker build -t trainjob:$$($(BIN)/python -c 'import trainjob; print(trainjob.__version__)') .

image-cpu:  ## the image on the CPU stand-in base (needs root, debootstrap and Docker)
	scripts/build_base_image.sh
	docker build --network host --build-arg BASE_IMAGE=trainjob-base-standin:tf2.21.0-py3.11-bookworm -t trainjob:0.1.0-cpu-standin .

clean:
	rm -rf $(VENV) .demo .pytest_cache build dist src/*.egg-info
