# The two set-up commands: `make demo` and `make test`. Both install first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint format bench clean

install:
	NOTECODER_VENV=$(VENV) ./scripts/install.sh

demo: install
	$(VENV)/bin/notecoder demo

test: install
	$(PY) -m ruff check lib jobs tests benchmarks
	$(PY) -m ruff format --check lib jobs tests benchmarks
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check lib jobs tests benchmarks
	$(PY) -m ruff format --check lib jobs tests benchmarks

format: install
	$(PY) -m ruff format lib jobs tests benchmarks
	$(PY) -m ruff check --fix lib jobs tests benchmarks

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf .demo .pytest_cache
