# Two commands do everything on a fresh machine: `make demo` (the main job on the toy world) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SSPO := $(BIN)/sspo

.PHONY: setup demo demo-video test test-deps bench faults clean-demo

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

# The same pipeline on the video world, as a DVC experiment (README, Video). A smaller bootstrap and training budget
# than the image demo's; the base's captions are wrong about direction only, the motion modules train.
VIDEO_DEMO := -S world.video=true -S bootstrap.family=video -S bootstrap.unet_steps=1000 \
	-S bootstrap.unet_batch_size=16 -S bootstrap.caption_noise_color=0 -S prepare.frames=8 \
	-S train.train_modules=motion -S train.steps=100 -S train.batch_size=8 -S 'evaluate.seeds=[0,1]'
demo-video: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc exp run $(VIDEO_DEMO)
	@echo "Oracle score (mean of colour, shape, direction correct); clips in eval/sspo/clips/"
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
