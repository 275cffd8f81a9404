# Drip: `make demo` runs the scripted tour, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PG_TEST_DSN ?= postgresql://drip_test:drip_test@127.0.0.1:5432/drip_test

.PHONY: install demo test test-fast lint format bench postgres clean contracts devnet

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# anvil (the local EVM node) and solc, from npm, pinned by package-lock.json
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch node_modules/.installed

node_modules: node_modules/.installed

# rebuild the committed ABI + bytecode artifacts from contracts/*.sol
contracts: node_modules
	node scripts/compile-contracts.js src/drip/chain/artifacts

devnet: $(STAMP) node_modules
	$(BIN)/drip devnet

demo: $(STAMP)
	$(BIN)/drip demo

# Starts PostgreSQL (installing it if missing), then runs lint, types and every test.
test: $(STAMP) node_modules
	@dsn=$$(bash scripts/postgres-up.sh) || { echo "PostgreSQL could not be started" >&2; exit 1; }; \
	export DRIP_TEST_POSTGRES_DSN=$$dsn; \
	$(MAKE) --no-print-directory lint && \
	$(BIN)/pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/pytest -q -x

lint: $(STAMP)
	$(BIN)/ruff check --no-cache src tests bench examples
	$(BIN)/ruff format --no-cache --check src tests bench examples
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests bench examples
	$(BIN)/ruff check --fix src tests bench examples

bench: $(STAMP) node_modules
	@dsn=$$(bash scripts/postgres-up.sh); DRIP_TEST_POSTGRES_DSN=$$dsn $(BIN)/python bench/ledger.py
	$(BIN)/python bench/middleware.py
	$(BIN)/python bench/x402.py

postgres:
	@bash scripts/postgres-up.sh

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache drip-demo.db*
