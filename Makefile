# Two commands on a fresh machine: `make run` (install, then run the bundled model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= models/tiny-llama-pycode
TORCH_VERSION ?= 2.13.0

.PHONY: install run test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# Pinned first: an unpinned torch would pull a different build (and CUDA packages) from the index.
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Serves the OpenAI API on http://127.0.0.1:23333 (Ctrl-C stops it); HOST/PORT override.
HOST ?= 127.0.0.1
PORT ?= 23333
run: install
	$(BIN)/microscale serve $(MODEL) --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/ruff check .

# Two workers (pytest-xdist), one per core of the CI machine; loadscope keeps each module's fixtures (engines,
# servers, the compile sweep) on one worker.
test: install lint
	$(BIN)/python -m pytest -q -n 2 --dist loadscope

clean:
	rm -rf $(VENV) build *.egg-info
