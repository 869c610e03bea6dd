# driftwarden: `make run` (collector + agent + live alert view) and `make test` (whole suite).
PY := .venv/bin/python
ARGS ?=

.PHONY: setup run trace test lint bench bench-collector clean

setup:
	bash scripts/setup-host.sh

run: setup
	bash scripts/run-local.sh $(ARGS)

trace: setup
	$(PY) -m driftwarden trace $(ARGS)

test: setup
	$(PY) -m ruff check .
	DRIFTWARDEN_REQUIRE_INTEGRATION=1 $(PY) -m pytest -q $(ARGS)

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) -m bench.probe_overhead --out bench/RESULTS.md $(ARGS)

bench-collector: setup
	$(PY) -m bench.collector_e2e --out bench/COLLECTOR-RESULTS.md $(ARGS)

clean:
	rm -rf .venv .setup build *.egg-info .pytest_cache
