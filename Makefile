# Two entry points: `make demo` (the whole chain on an embedded default) and `make test`.
# Both create .venv if missing and install torch 2.13.0 FIRST (CPU wheel), then the project.
# GPU clusters: install your CUDA build of torch into your environment first, then `pip install -e .`.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.maskpot-installed
DEMO_ARGS ?=
PYTEST_ARGS ?=

export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup demo test test-fast clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/maskpot demo $(DEMO_ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
