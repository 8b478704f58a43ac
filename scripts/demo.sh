#!/usr/bin/env bash
# The main job: fine-tune the embedded SmolLM2-135M-Instruct on data/ and ship it.
# check-data -> eval of the base model -> train -> eval of the run -> export (GGUF +
# Modelfile, verified in llama.cpp) -> eval of the GGUF -> before/after table. The run and the GGUF are
# evaluated twice: free decoding, and decoding constrained to data/schema.json (Ollama's format).
set -euo pipefail
cd "$(dirname "$0")/.."
LLM_FT=".venv/bin/llm-ft"
RUN="${RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
START=$(date +%s)
step() { printf '\n\033[1m== %s\033[0m  (%ss)\n' "$1" "$(( $(date +%s) - START ))"; }

step "1/6 check the data"
$LLM_FT check-data data

step "2/6 evaluate the base model (before fine-tuning)"
$LLM_FT eval default --data data/test.jsonl --out "$RUN/eval-base" --no-loss

step "3/6 fine-tune (LoRA, default settings) into $RUN"
$LLM_FT train --model default --data data --out "$RUN"

step "4/6 evaluate the run (base + adapter), free and schema-constrained decoding"
$LLM_FT eval "$RUN" --data data/test.jsonl --no-loss --format schema

step "5/6 export a GGUF + Modelfile and verify it in llama.cpp"
$LLM_FT export "$RUN"
GGUF=$(ls -t "$RUN"/export/*.gguf | head -1)

step "6/6 evaluate the exported GGUF through llama.cpp, free and with Ollama's format (the schema)"
$LLM_FT eval "$GGUF" --data data/test.jsonl --no-loss --format schema --out "$RUN/export/eval-gguf"

.venv/bin/python scripts/demo_summary.py "$RUN" "$GGUF" "$(( $(date +%s) - START ))"
