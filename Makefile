# Conveyor: two commands do all set-up.
#   make run   create .venv, install the locked dependencies, run the flagship pipeline
#   make test  same set-up, then the test suite

PYTHON ?= python3
UV_VERSION := 0.13.8
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.synced
PYTEST_ARGS ?=

# One local Prefect home under the repo: the run history the UI shows.
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: venv run test lint ui stop serve-local benchmark lock clean

venv: $(STAMP)

# Re-synced only when the lockfile or pyproject changes: the second call is instant.
$(STAMP): pyproject.toml uv.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install -qq --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv sync --frozen --compile-bytecode --python $(BIN)/python --quiet
	@# A migrated empty Prefect database, copied into fresh Prefect homes (conveyor/prefect_api.py).
	@$(BIN)/python -m conveyor.prefect_api template >/dev/null
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/conveyor run $(ARGS)

test: $(STAMP) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff: lint + import order + formatting (line length 110, pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Browse the recorded runs (stop with Ctrl-C). A run leaves its server up for 30 min (the UI is then
# already at http://127.0.0.1:4200); this one takes its place in the foreground.
ui: $(STAMP)
	@$(BIN)/conveyor server stop >/dev/null
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

# Stop the Prefect server a run left up.
stop: $(STAMP)
	$(BIN)/conveyor server stop

# The quick set (minutes); benchmarks/README.md lists every script, its figures and the command for each.
ROWS ?= 1000000
benchmark: $(STAMP)
	$(BIN)/python -m benchmarks.overhead --rows $(ROWS)
	$(BIN)/python -m benchmarks.train_engines --rows $(ROWS)
	$(BIN)/python -m benchmarks.search --budget 6

lock: $(STAMP)
	$(BIN)/uv lock

clean:
	@test ! -x $(BIN)/conveyor || $(BIN)/conveyor server stop >/dev/null
	rm -rf $(VENV) .prefect data .pytest_cache

# The served setup on this machine: Prefect server + work pool + deployments + worker (Ctrl-C stops it).
serve-local: $(STAMP)
	$(BIN)/conveyor serve-local
