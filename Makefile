# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_FILES := $(wildcard protos/propensity/v1/*.proto)

.PHONY: help venv proto proto-check run demo test test-fast clean bench bench-scale

help:
	@echo "make run          build everything from demo data and serve on localhost:50051"
	@echo "make test         run the whole test suite"
	@echo "make proto        regenerate Python code from protos/"
	@echo "make proto-check  fail if generated code is out of sync with protos/"

venv: $(STAMP)

# Pinned install: pyproject.toml says what we need, requirements.lock fixes every version.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Spark (features.engine = "spark", the spark store profile) needs a Java runtime: Debian's if none is installed.
	@command -v java >/dev/null || (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c requirements.lock -e ".[dev]"
	touch $(STAMP)

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO_FILES)

proto-check: $(STAMP)
	$(BIN)/python -m propensity.codegen_check

run: $(STAMP)
	$(BIN)/propensity run --demo --serve

demo: $(STAMP)
	$(BIN)/propensity demo-data

test: $(STAMP) proto-check
	@command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)  # the overload and open-loop tests drive h2load
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf var feature_repo/data

# Benchmarks (docs/benchmarks/): builds var/bench/ if missing, h2load from Debian's nghttp2-client,
# the local Redis (scripts/services.sh) for the Redis profile's user-read floor.
bench: $(STAMP)
	@command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	@(command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG) || bash scripts/services.sh || echo "bench: no local Redis; the Redis user read will be reported as not measured"
	$(BIN)/python -m bench.run

# The offline pipeline on ~20 million generated events: time and peak memory per stage (docs/benchmarks/scale.md).
# ENGINE=spark builds the features on Spark local[2]; ARGS="--users 25000 --items 4000" for a small shop.
ENGINE ?= duckdb
bench-scale: $(STAMP)
	$(BIN)/python -m bench.scale --engine $(ENGINE) $(ARGS)
