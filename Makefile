# Every target sets up .venv on first use; a second run with nothing changed skips the install.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/line.yaml
ARGS   ?=
# Without a GPU, pin the CPU build of torch (a plain install pulls the multi-GB CUDA build).
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
export PIP_CONSTRAINT ?= $(CURDIR)/constraints-cpu.txt
endif

.PHONY: setup train test tensorboard bench check lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/trainer fit --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir runs --host 127.0.0.1

bench: $(STAMP)
	$(PY) scripts/benchmark.py $(ARGS)

check: $(STAMP)
	$(PY) -m models.gradcheck

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
