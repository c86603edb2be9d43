# `make demo` and `make test` work on a fresh machine: both create .venv and install on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test reference clean

install: $(STAMP)

# torch is pinned to the CPU build that ships on this kind of machine; the package's own
# requirement is a range, so GPU users keep their CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/moe-offload demo

# Retrain the shipped reference MoE (needs the Debian packages bible-kjv-text and bible-kjv);
# resumable: an interrupted run continues from its last saved step.
reference: $(STAMP)
	$(BIN)/moe-offload reference

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .demo
