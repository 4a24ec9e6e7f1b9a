# townhall: the two commands a newcomer runs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install sysdeps web demo serve test lint typecheck unit bench lock clean

# One virtual environment with the package, its test tools and pinned versions (constraints.txt).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP) web

## Front-end packages for the web pages (hls.js), from package-lock.json, when the app has any.
web:
	@if [ -f package-lock.json ]; then \
		[ node_modules/.package-lock.json -nt package-lock.json ] || npm ci --no-audit --no-fund --loglevel=error; \
	fi

## Debian packages the tests use as real peers (chromium, nginx, ffmpeg): installed if missing.
sysdeps:
	scripts/sysdeps

## The main job: the embedded default on 127.0.0.1:8080 with a live demo; prints the URL.
demo: $(STAMP) web
	$(BIN)/townhall demo

serve: $(STAMP) web
	$(BIN)/townhall serve

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

## The suite on two pytest-xdist workers, a test file per worker at a time (module fixtures stay
## in one process). Tests take ports, temp dirs, schemas and Redis prefixes of their own, so two
## run side by side; much of the suite's time is waits on real time (media, restarts), which
## the second worker fills. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
unit: $(STAMP) web sysdeps
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

## Everything CI runs: lint, strict types, the whole suite (needs PostgreSQL on 127.0.0.1:5432).
test: sysdeps lint typecheck unit

## Benchmarks (not part of the tests): see BENCHMARKS.md.
bench: $(STAMP) web
	scripts/sysdeps --bench
	$(BIN)/python bench/bench_control.py
	$(BIN)/python bench/bench_spaces.py
	$(BIN)/python bench/bench_stage.py
	$(BIN)/python bench/bench_audience.py
	$(BIN)/python bench/bench_redis.py
	$(BIN)/python bench/bench_replay.py
	$(BIN)/python bench/bench_edge.py
	PYTHONPATH=. $(BIN)/python bench/bench_admission.py
	$(BIN)/python bench/bench_loadtest.py

## Re-pin every dependency after changing pyproject.toml.
lock:
	rm -rf /tmp/townhall-lock && $(PYTHON) -m venv /tmp/townhall-lock
	/tmp/townhall-lock/bin/pip install --quiet -e '.[test,bench]'
	/tmp/townhall-lock/bin/pip freeze --exclude-editable | grep -iv '^townhall' > constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
