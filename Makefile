# qrw — two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data

.PHONY: install demo test lint typecheck unit bench clean stubs

install: $(STAMP)

# torch is installed first and pinned (the CPU wheel on disk); an unpinned torch pulled in
# by a later dependency would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py $(wildcard proto/queryrewrite/v1/*.proto)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,spark]'
	touch $(STAMP)

stubs: install
	$(BIN)/python setup.py -q gen_stubs

demo: install
	$(BIN)/qrw demo --data-root $(DATA)

lint: install
	$(BIN)/ruff check rewrite offline tests bench
	$(BIN)/ruff format --check rewrite offline tests bench

typecheck: install
	$(BIN)/mypy rewrite offline

unit: install
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench: install
	$(BIN)/python bench/bench_server_mode.py --rounds 3
	$(BIN)/python bench/bench_detector.py

clean:
	rm -rf $(VENV) rewrite/_pb *.egg-info build
