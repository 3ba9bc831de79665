# Two commands do everything on a fresh machine: `make demo` (the main job on the toy world) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SSPO := $(BIN)/sspo

.PHONY: setup demo test test-deps bench faults clean-demo

# torch first and pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# The stages and their order live in dvc.yaml; `dvc repro` runs the ones whose inputs or params changed.
demo: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	@echo "Oracle score (mean of colour, shape, position correct); images in eval/sspo/"
	@cat eval/sspo/table.md

# Debian's Prometheus and Pushgateway for the telemetry tests; what cannot be installed is named in one line.
test-deps:
	@sh tools/install-test-deps

test: setup test-deps
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/step_times.py
	$(BIN)/python bench/prepare_throughput.py

# The fault campaign (kill -9, a faulty S3 server, generated bad inputs, NaN, corrupt checkpoints) as one table.
faults: setup
	$(BIN)/python bench/faults.py

clean-demo:
	rm -rf data/world data/prepared models/base runs/sspo runs/registered.json eval/sspo models/exported

# Builds the CPU image with podman (a stand-in base image where none can be pulled) and runs it offline: the CLI,
# one pipeline step as a pod runs it, and the local pipeline. Installs podman with apt; needs root or sudo -n.
.PHONY: image-test
image-test:
	$(PYTHON) tools/image-test
