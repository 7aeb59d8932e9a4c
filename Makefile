# The two commands a fresh machine needs: `make demo` and `make test`. Both set the machine up first:
# `make setup` installs everything any target needs (scripts/setup.sh), so no test installs anything.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup layers test unit integration demo bench doctor clean

setup:
	@scripts/setup.sh

test: setup layers
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The import layers (pyproject.toml [tool.importlinter]): lower layers never import higher ones.
layers: setup
	$(VENV)/bin/lint-imports --no-cache

unit: setup
	$(PY) -m pytest -q -p no:cacheprovider tests/unit $(PYTEST_ARGS)

integration: setup
	$(PY) -m pytest -q -p no:cacheprovider tests/integration $(PYTEST_ARGS)

demo: setup
	$(PY) -m pool.cli.demo

bench: setup
	$(PY) -m pytest -q -p no:cacheprovider bench --benchmark-only --benchmark-json=bench/results/latest.json
	$(PY) bench/report.py bench/results/latest.json

doctor: setup
	$(VENV)/bin/pool doctor

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
