# driftwarden: `make run` (trace on this host) and `make test` (whole suite) on a fresh host.
PY := .venv/bin/python
ARGS ?=

.PHONY: setup run test lint bench clean

setup:
	bash scripts/setup-host.sh

run: setup
	$(PY) -m driftwarden trace $(ARGS)

test: setup
	$(PY) -m ruff check .
	DRIFTWARDEN_REQUIRE_INTEGRATION=1 $(PY) -m pytest -q $(ARGS)

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) -m bench.probe_overhead --out bench/RESULTS.md $(ARGS)

clean:
	rm -rf .venv .setup build *.egg-info .pytest_cache
