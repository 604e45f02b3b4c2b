# Two commands from a fresh clone: `make demo` and `make test`. Each sets up .venv itself.
# `make -f path/to/Makefile -C somewhere demo` (or pipeline, serve) reads Galaxy10_DECals.h5 and
# writes the sample, the data and the model in `somewhere`; the scripts, the requirements and .venv
# are always the project's.
MAKEFILE := $(abspath $(lastword $(MAKEFILE_LIST)))
ROOT     := $(dir $(MAKEFILE))
PYTHON ?= python3
VENV   ?= $(ROOT).venv
PY     ?= $(VENV)/bin/python

# The demo: the real file when it is here, else the built-in sample; a CPU profile without a GPU.
H5           ?= Galaxy10_DECals.h5
SAMPLE       ?= galaxy10_sample.h5
SAMPLE_N     ?= 2000
CPU_PROFILE  ?= --preset cpu
H5_DOWNLOAD  ?=
HOST         ?= 127.0.0.1
PORT         ?= 8000

RUNTIME := $(VENV)/.runtime-installed
DEV     := $(VENV)/.dev-installed

.PHONY: help demo pipeline full serve test test-fast lint bench results clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

# The galaxy10 package (the library the scripts import) is installed editable: changes take effect at once.
$(RUNTIME): $(ROOT)requirements.txt $(ROOT)pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(ROOT)requirements.txt
	$(PY) -m pip install -q --no-deps -e $(ROOT)
	touch $@

$(DEV): $(RUNTIME) $(ROOT)requirements-dev.txt
	$(PY) -m pip install -q -r $(ROOT)requirements-dev.txt
	touch $@

demo: $(RUNTIME)  ## sample (or Galaxy10_DECals.h5) -> export -> balance -> train -> web page
	@$(PY) $(ROOT)main.py --host $(HOST) --port $(PORT) --check-port
	@$(MAKE) -f $(MAKEFILE) --no-print-directory pipeline PY=$(PY)
	@$(MAKE) -f $(MAKEFILE) --no-print-directory serve PY=$(PY)

pipeline: $(RUNTIME)  ## the demo's data and training steps, without the web page
	@set -e; \
	if [ -n "$(H5_DOWNLOAD)" ] || [ -f "$(H5)" ]; then h5="$(H5)"; echo "using $(H5)"; \
	else h5="$(SAMPLE)"; $(PY) $(ROOT)sample_data.py --out "$$h5" --n $(SAMPLE_N); fi; \
	$(PY) $(ROOT)load_data.py $(H5_DOWNLOAD) --h5 "$$h5" --out data --force; \
	$(PY) $(ROOT)preprocess_and_balancing.py --h5 "$$h5" --out balanced_data --force; \
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then profile=""; \
	else profile="$(CPU_PROFILE)"; echo "no GPU: training the CPU profile ($(CPU_PROFILE))"; fi; \
	$(PY) $(ROOT)cnn.py $$profile

full: $(RUNTIME)  ## download Galaxy10_DECals.h5 (2.54 GB), export, balance and train on it
	@$(MAKE) -f $(MAKEFILE) --no-print-directory pipeline PY=$(PY) H5_DOWNLOAD=--download

serve: $(RUNTIME)  ## start the upload page on http://$(HOST):$(PORT)
	$(PY) $(ROOT)main.py --host $(HOST) --port $(PORT)

test: $(DEV)  ## lint, then the whole test suite
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-fast: $(DEV)  ## lint, then the fast lane: no slow, distributed, browser or e2e tests
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow and not distributed and not browser and not e2e"

bench: $(DEV)  ## every benchmark at its documented size
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

results:  ## regenerate docs/results.md from benchmarks/results/
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) $(ROOT)benchmarks/results.py

clean:  ## remove generated data, checkpoints and the environment
	rm -rf $(VENV) data balanced_data $(SAMPLE)
