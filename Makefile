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

run: install
	$(BIN)/microscale generate $(MODEL) --prompt "def fibonacci(n):" --max-tokens 64 --temperature 0

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
