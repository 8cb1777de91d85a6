# The book's commands. `make book` builds the book, `make test` runs the tests.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= ci
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Tests and the book read the mirror beside the repo when it exists.
LEUKEMIA_DATA ?= $(if $(wildcard ../shared/datasets),$(abspath ../shared/datasets),)
export LEUKEMIA_DATA

.PHONY: venv test test-fast book notebook lock clean explore explore-checkpoint

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -n 2 --durations=25 tests

# The development tier: every test not marked slow (no training beyond a few steps, no
# book, no browser), a few minutes on 2 cores. `make test` (and CI) still runs everything.
test-fast: venv
	$(PY) -m pytest -n 2 -m "not slow" tests

# The book: execute every chapter of _toc.yml with papermill under PROFILE (smoke, ci,
# full), then build the HTML with Jupyter Book 1 into _build/html (open index.html).
book: venv
	$(PY) book/build.py --profile $(PROFILE)

# One chapter, executed only (no HTML): make notebook NB=02_data PROFILE=smoke
notebook: venv
	@test -n "$(NB)" || { echo "usage: make notebook NB=02_data [PROFILE=ci]" >&2; exit 2; }
	$(PY) book/build.py --profile $(PROFILE) --notebook $(NB)

# The prediction explorer, served by Voila at http://127.0.0.1:$(PORT) (Ctrl-C stops it).
# RUN: a run folder (model.safetensors + predictions_<split>.csv) or a predictions CSV;
# by default the baseline that `make book` leaves, trained first if it is not there.
EXPLORE_RUN := _build/artifacts/$(PROFILE)/pbc_convnext_atto_s0
RUN ?= $(EXPLORE_RUN)
PORT ?= 8866
explore: venv
	@if [ "$(RUN)" = "$(EXPLORE_RUN)" ] && [ ! -f "$(RUN)/model.safetensors" ]; then \
	  echo "no checkpoint in $(RUN): training it first (make explore-checkpoint)"; \
	  $(MAKE) --no-print-directory explore-checkpoint; fi
	$(PY) -m leukemia_core.cli.explore $(RUN) --port $(PORT)

# The checkpoint `make explore` serves, trained as notebooks/03_baseline.py trains it.
explore-checkpoint: venv
	$(VENV)/bin/leukemia-core train --dataset pbc --model convnext_atto --profile $(PROFILE) \
	  --out $(EXPLORE_RUN) --overwrite

lock: venv
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e' > requirements.lock.new && mv requirements.lock.new requirements.lock

clean:
	rm -rf _build
