# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-out
LOCAL_OUT ?= local-cluster-out
SCALE ?= cpu

.PHONY: setup test test-fast test-benchmarks demo local-cluster browser clean

# torch first (the pinned CPU wheel): anything that pulls an unpinned torch would fetch gigabytes of CUDA.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip check
	touch $(STAMP)

setup: $(STAMP)

# The report test opens report.html in Debian's headless Chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the report test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# --durations: the 25 slowest tests close the log, to keep the suite well under its 30-minute budget.
# Two workers on the 2-core machine: much of an integration test is waiting on Ray, MLflow and process starts.
TEST_WORKERS ?= 2
test: setup browser
	$(BIN)/pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not benchmark"

test-fast: setup
	$(BIN)/pytest -q -m "not slow and not benchmark"

# Every script in benchmarks/ run end to end in its smallest mode (tests/benchmarks/): about 5 min on 2 cores (267 s
# measured), so not in `make test`; CI runs both (.ci/run). One test per script, spread over the workers (loadgroup: a module
# that runs its script once for several tests keeps to one worker).
test-benchmarks: setup
	$(BIN)/pytest -q --durations=10 -n $(TEST_WORKERS) --dist loadgroup -m benchmark tests/benchmarks

demo: setup
	$(BIN)/python -m raymem.demo --out $(DEMO_OUT) --scale $(SCALE)

# A Ray head, an MLflow server and S3 (moto) on 127.0.0.1 running the tiny pipeline as a Ray job, then stopped
# (docs/cluster.md, "Try it locally first"); KEEP=1 leaves them up until Ctrl-C.
local-cluster: setup
	$(BIN)/raymem local-cluster --out $(LOCAL_OUT)$(if $(KEEP), --keep)

# Mutation testing (mutmut) of the compute core, about 3 h on 2 cores with MUTATION_JOBS=2 (tools/mutation_core.sh), or of one module:
# make mutation MODULE=raymem/audit/statistics.py TESTS="tests/unit/..."
mutation: setup
	$(if $(MODULE),tools/mutation.sh $(MODULE) $(TESTS),tools/mutation_core.sh)

clean:
	rm -rf $(DEMO_OUT) $(LOCAL_OUT) .pytest_cache
