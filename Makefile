# Every target sets itself up: a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench proto lint clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "svidd needs Python 3.11 or newer; set PYTHON=")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m agent_attestor.demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pytest bench -p no:randomly --benchmark-enable --benchmark-only \
		--benchmark-json=bench/results/latest.json -o testpaths=bench -o addopts="" $(BENCH_ARGS)

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
	rm -rf $(VENV) build dist *.egg-info .run bench/results
