# One entry point for humans and CI. Every target bootstraps what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-unit test-mc lint types bench lock upgrade clean

$(STAMP): pyproject.toml requirements/lock.txt scripts/bootstrap.sh broker/client/js/package-lock.json
	bash scripts/bootstrap.sh $(VENV)
	touch $(STAMP)

## Start the broker (embedded redis-server unless BROKER_REDIS_URL is set)
run: $(STAMP)
	$(PY) -m broker serve

## The whole test suite: unit + integration + mission-critical, against real redis-server processes
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests mission_critical

test-unit: $(STAMP)
	$(PY) -m pytest -q tests

test-mc: $(STAMP)
	$(PY) -m pytest -q mission_critical

lint: $(STAMP)
	$(VENV)/bin/ruff check .

types: $(STAMP)
	$(VENV)/bin/mypy broker

bench: $(STAMP)
	$(PY) -m bench

## Re-pin requirements/lock.txt after editing pyproject.toml (keeps every pin that still fits)
lock: $(STAMP)
	bash scripts/lock.sh
	bash scripts/bootstrap.sh $(VENV)

## Move every pin to the newest allowed release, install it, and run lint, types and the whole suite on it.
## Commit requirements/lock.txt only when all of it passes: upgrading is a deliberate change, never an accident.
upgrade: $(STAMP)
	bash scripts/lock.sh --upgrade
	bash scripts/bootstrap.sh $(VENV)
	touch $(STAMP)
	$(MAKE) lint types test

clean:
	rm -rf $(VENV) .data .mypy_cache .ruff_cache
