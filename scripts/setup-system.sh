#!/usr/bin/env bash
# System tools some tests use, installed where the platform allows it:
#  - Go (Ollama renders Modelfile TEMPLATEs with Go's text/template; a test uses the real engine).
# Missing tools make those tests skip with a reason locally; CI installs them.
set -euo pipefail
# --- llm-ft serve: Debian's Chromium, which tests/test_serve.py drives headless (Playwright) ---
# Its own block, before the early exit below; a failed install only makes those tests skip.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing system packages: chromium"
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; } ||
    echo "note: chromium not installed; the browser tests of tests/test_serve.py will skip"
fi
# --- end llm-ft serve ---
need=()
command -v go >/dev/null 2>&1 || need+=(golang-go)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing system packages: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null; }
elif command -v brew >/dev/null 2>&1; then
  brew install go >/dev/null || true
else
  echo "note: ${need[*]} not installed (no apt-get as root or brew); the tests that need them will skip"
fi
