#!/usr/bin/env bash
# The main job: check the data, then (as later stages land) train, evaluate, export, verify.
set -euo pipefail
LLM_FT=".venv/bin/llm-ft"
$LLM_FT check-data data
echo
echo "next: training (llm-ft train) is not built yet"
