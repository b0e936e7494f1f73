# `make demo` and `make test` are the README's two commands: each installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[worker,ops,dev]"
	touch $@

# Debian packages for the browser test (chromium, chromium-driver, fonts), for validating
# docker-compose.yml (docker-compose: no engine needed) and the load generator of bench_forget
# (wrk). A no-op when present; without root or apt-get the tests that need them skip, saying why.
SYSTEM_PACKAGES := chromium chromium-driver fonts-liberation docker-compose wrk
system-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v docker-compose >/dev/null && command -v wrk >/dev/null; then \
		echo "system packages present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); \
	else \
		echo "system-deps: need root and apt-get for $(SYSTEM_PACKAGES); their tests will skip"; \
	fi

demo: install
	$(BIN)/lethe demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: system-deps lint
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

# Every benchmark of docs/BENCHMARKS.md with its documented arguments (about an hour on 2 cores;
# bench_forget needs wrk and bench_pipeline the PostgreSQL and Redis of the tests).
bench: system-deps install
	$(BIN)/python -m bench.bench_forget --requests 20000 --concurrency 32 --workers 1 2
	$(BIN)/python -m bench.bench_pipeline
	$(BIN)/python -m bench.bench_efficacy
	$(BIN)/python bench/bench_training.py --repeats 5 --epochs 5
	$(BIN)/python bench/bench_rollback.py
	$(BIN)/python bench/bench_delta_parts.py --repeats 10
	$(BIN)/python bench/bench_audit.py --out docs/benchmarks
	$(BIN)/python bench/bench_screening.py --epochs 6 --batch-size 16 --optimizer adam --lr 0.001
	$(BIN)/python bench/bench_screening.py

clean:
	rm -rf $(VENV) lethe-data .pytest_cache .mypy_cache .ruff_cache
