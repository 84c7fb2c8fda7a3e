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

# Benchmarks (printed figures, not tests; see "Benchmarks" in the README). Bounded: ~45 min on
# 2 cores. ONLINE_N: index size; the 1M-entry IVF fast-scan PQ index is built once (~2 min)
# and cached under var/bench/.
# NIGHTLY_SIZES: add 5000000 for the 5M-turn point (long: the job prints an estimate first).
BENCH_STAMP   := $(VENV)/.bench-installed
NIGHTLY_SIZES ?= 100000 1000000
NIGHTLY_ARGS  ?= --detector bert_span
ONLINE_N      ?= 1000000
# the static query tower the encoder and online benchmarks also measure (distilled first, ~3 min)
STATIC_DPR    ?= var/bench/dpr-static
ONLINE_ARGS   ?= --requests 1000 --rounds 3 --concurrency 1 2 4 8 16 32 64

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/qrw train dpr --zero-shot --query-static --distill-texts $(DATA)/slurp/lm.txt --out $(STATIC_DPR)
	$(BIN)/python bench/bench_encoders.py --data-root $(DATA) --static $(STATIC_DPR)/$$(cat $(STATIC_DPR)/LATEST)
	$(BIN)/python bench/bench_online.py --n $(ONLINE_N) $(ONLINE_ARGS) --json runs/bench/online.json
	$(BIN)/python bench/bench_online.py --n $(ONLINE_N) $(ONLINE_ARGS) --json runs/bench/online-static.json \
		--dpr $(STATIC_DPR)/$$(cat $(STATIC_DPR)/LATEST) --head
	$(BIN)/python bench/bench_nightly.py --sizes $(NIGHTLY_SIZES) $(NIGHTLY_ARGS) --data-root $(DATA)
	$(BIN)/python bench/bench_detector.py
	$(BIN)/python bench/bench_grpc_floor.py --rounds 3
	$(BIN)/python bench/bench_mixed.py --n $(ONLINE_N) --dpr $(STATIC_DPR)/$$(cat $(STATIC_DPR)/LATEST) \
		--json runs/bench/mixed.json
	$(BIN)/python bench/bench_processes.py --n $(ONLINE_N) --rounds 2 --requests 3000 \
		--dpr $(STATIC_DPR)/$$(cat $(STATIC_DPR)/LATEST) --json runs/bench/processes.json

clean:
	rm -rf $(VENV) rewrite/_pb *.egg-info build
