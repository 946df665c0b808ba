#!/usr/bin/env bash
# llama.cpp checks of `bitsmith export --to gguf` (a benchmark, not a test; run on demand).
#
#   bench/export_llamacpp.sh [LLAMA_BIN_DIR]
#
# Builds nothing in the repo: LLAMA_BIN_DIR (default /tmp/llsrc/.../build/bin) must hold llama-perplexity
# and llama-simple, built from the llama-cpp-python sdist as ../shared/PEERS.md describes. Steps:
#   1. quantize smollm2-135m at w4g32 (RTN) and export it as Q4_1 (exact re-encoding of its codes)
#   2. llama-simple: a short greedy continuation (read it: it must be coherent English)
#   3. perplexity at ctx 512 on the first 60,000 chars of Pride and Prejudice, llama.cpp vs `bitsmith eval`
#      on the checkpoint; they should agree within 1 %.
set -euo pipefail
BIN=${1:-/tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin}
WORK=${WORK:-/tmp/bitsmith-export-bench}
PY=${PY:-.venv/bin/python}
mkdir -p "$WORK"
TEXT="$WORK/pp60k.txt"
head -c 60000 ../shared/data/dev/austen_pride_and_prejudice.txt > "$TEXT"

[ -d "$WORK/smol-w4g32" ] || $PY -m bitsmith quantize smollm2-135m --spec w4g32 --out "$WORK/smol-w4g32"
[ -f "$WORK/smol-w4g32.gguf" ] || $PY -m bitsmith export "$WORK/smol-w4g32" --to gguf --out "$WORK/smol-w4g32.gguf"

echo "== llama-simple (greedy, 40 tokens)"
"$BIN/llama-simple" -m "$WORK/smol-w4g32.gguf" -n 40 "The capital of France is" 2>/dev/null || true
echo

echo "== llama.cpp perplexity, ctx 512"
"$BIN/llama-perplexity" -m "$WORK/smol-w4g32.gguf" -f "$TEXT" -c 512 -t 2 2>&1 | grep -E "Final estimate|^\[" | tail -3

echo "== bitsmith eval on the checkpoint, ctx 512"
$PY -m bitsmith eval "$WORK/smol-w4g32" --text "$TEXT" --ctx 512
# Note: llama-perplexity scores only the second half of each window (it skips the first n_ctx/2
# tokens of every chunk); bitsmith eval scores whole windows. Compare like with like before reading
# a difference above 1 % as an export error.
