# camserve: `make demo` runs the main job, `make test` runs the tests. Both install what
# they need into .venv first (torch/torchvision pinned to the builds this project is tested with).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

export ORT_DISABLE_TELEMETRY := 1
export PYTHONUNBUFFERED := 1

.PHONY: install java test-deps test test-fast demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[export,serve,kserve,compare,postgres,test]'
	# pytorch-grad-cam is the numerical oracle of the tests only; its declared deps would
	# pull the GUI build of OpenCV beside the headless one, so it comes without them.
	$(PY) -m pip install -q --no-deps grad-cam==1.5.7
	touch $(STAMP)

java:
	@bash scripts/ensure_java.sh

# Services and tools the tests start for real: PostgreSQL (audit sink), Chromium (report).
test-deps: java
	@bash scripts/ensure_postgres.sh >/dev/null
	@sh scripts/ensure_chromium.sh >/dev/null

test: install test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not server" $(PYTEST_ARGS)

demo: install java
	$(PY) -m camserve.demo --out demo_out

bench: install
	$(PY) bench/bench_export.py

clean:
	rm -rf $(VENV) demo_out logs .pytest_cache
