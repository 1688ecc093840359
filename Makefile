# Every target sets itself up: a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run example test bench bench-long bench-scale proto lint clean

# Runs on the first `make` (and when pyproject.toml changes); the only slow step, so it says so and
# lets pip show what it downloads instead of a minute or two of silence.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "svidd needs Python 3.11 or newer; set PYTHON=")'
	@echo "==> Setting up $(VENV): creating it and installing svidd's dependencies (first run only; a minute or two)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> Upgrading pip"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "==> Installing svidd and its dependencies"
	@$(BIN)/python -m pip install --progress-bar on -e '.[dev]'
	@touch $(STAMP)
	@echo "==> $(VENV) is ready"

run: $(STAMP)
	@echo "==> Starting svid-server and svid-agent in .run/ (a few seconds; Ctrl-C stops both)"
	@$(BIN)/python -m agent_attestor.demo

# examples/ end to end on a fresh server and agent in .example/ (about 25 s; Ctrl-C stops it all).
example: $(STAMP)
	@echo "==> Running examples/: an MCP server and an agent runtime with task tokens, and mTLS"
	@$(BIN)/python -m examples.run

# Test files in parallel, each file on one worker (its module fixtures start once). Most of the
# suite waits on real servers and agents, not on CPU, so one worker more than the cores (at most
# 4): on this 2-core machine 8:36 where one a core took 11:15. TEST_WORKERS=N to choose.
TEST_WORKERS ?= $(shell $(BIN)/python -c "import os; print(min(len(os.sched_getaffinity(0)) + 1, 4))" 2>/dev/null || echo 2)
# The servers, agents and CLIs the tests start (hundreds of processes) each import the project:
# compiled once here, not again in each (PYTHONDONTWRITEBYTECODE, which some machines set, stops
# them keeping what they compiled; about 0.3 s of CPU a process).
test: $(STAMP)
	@$(BIN)/python -m compileall -q -j 0 server svid agent_attestor examples tests
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# One judged table (bench/report.py has the legend), also in bench/results/table.txt; about 8
# minutes on 2 cores. SVIDD_BENCH_SCALE multiplies every round and sample count (0.2 to iterate).
BENCH_SCALE ?= 1
bench: $(STAMP)
	SVIDD_BENCH_SCALE=$(BENCH_SCALE) $(BIN)/python -m pytest bench -p no:randomly \
		--benchmark-enable --benchmark-only --benchmark-json=bench/results/latest.json \
		-o testpaths=bench -o addopts="" -o timeout=1800 $(BENCH_ARGS)

# The same table with 4x the rounds and samples: for numbers to quote.
bench-long: $(STAMP)
	$(MAKE) bench BENCH_SCALE=4

# Issue 13's scale table at the issue's sizes (tens of minutes on 2 cores): the agent in process at
# 1k / 10k / 100k entries, and the server as real processes (bench/test_bench_server_scale.py):
# CPU per write with 1 .. 100k entries held and 10 .. 1,000 agents, RSS at 100k and 1M entries, a
# real agent at 1k .. 100k entries and its renewals at 100 .. 10k workloads (5 min TTL).
# `make bench` runs the server file at its small sizes (about a minute and a half).
bench-scale: $(STAMP)
	SVIDD_SCALE_SIZES=1000,10000,100000 SVIDD_SCALE_WORKLOADS=1000,10000 \
	SVIDD_SERVER_SCALE_HELD=1,1000,10000,100000 SVIDD_SERVER_SCALE_AGENTS=10,100,1000 \
	SVIDD_SERVER_SCALE_TOTALS=100000,1000000 SVIDD_SERVER_SCALE_ON_AGENT=1000,10000,100000 \
	SVIDD_SERVER_SCALE_WORKLOADS=100,1000,10000 \
		$(BIN)/python -m pytest bench/test_bench_agent_scale.py bench/test_bench_server_scale.py \
		-p no:randomly --benchmark-enable --benchmark-only --benchmark-json=bench/results/scale.json \
		-o testpaths=bench -o addopts="" -s $(BENCH_ARGS)

proto: $(STAMP)
	$(BIN)/python proto/generate.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Every fuzz target in tests/fuzz for FUZZ_SECONDS seconds each, with fresh random seeds (`make
# test` runs them once, briefly and derandomized). Failing examples are kept in .hypothesis/.
FUZZ_SECONDS ?= 60
.PHONY: fuzz
fuzz: $(STAMP)
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest tests/fuzz -q $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .run .example bench/results
