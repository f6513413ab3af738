# tenantctl -- see README.md. Every target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install system-deps bench-deps run test bench lint clean

install: $(STAMP) system-deps

# redis-server backs the scale-out test (rate limits shared by replicas); as root
# on Debian it is installed, otherwise say what is missing (the test then fails).
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null; \
	  else echo "redis-server is missing: install it (Debian: apt-get install redis-server)" >&2; fi; }

# valgrind counts the instructions of a request (bench api_instructions); the
# other benchmarks run without it, and that one says it was skipped.
bench-deps:
	@command -v valgrind >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >/dev/null; \
	  else echo "valgrind is missing: bench api_instructions will be skipped (Debian: apt-get install valgrind)" >&2; fi; }

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: install
	$(BIN)/tenantctl up

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

bench: install bench-deps
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict control_plane data_plane infra bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
