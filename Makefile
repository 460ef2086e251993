# model-broker: `make run` starts the daemon, `make test` runs the suite. Both create .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_OUT := clients/python
LISTEN ?= 127.0.0.1:50051
CONFIG ?=

.PHONY: install proto proto-check lint test run bench clean

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

# Regenerate and fail if the committed stubs differ from what proto/ produces.
proto-check: proto
	@git diff --exit-code --stat -- $(PROTO_OUT)/modelbroker/v1 \
	  || (echo "generated stubs are stale: run 'make proto' and commit" >&2; exit 1)
	@test -z "$$(git status --porcelain -- $(PROTO_OUT)/modelbroker/v1)" \
	  || (echo "untracked generated stubs: run 'make proto' and commit" >&2; git status --short -- $(PROTO_OUT)/modelbroker/v1; exit 1)

lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

run: $(STAMP)
	$(BIN)/model-broker serve --listen $(LISTEN) $(if $(CONFIG),--config $(CONFIG),)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
