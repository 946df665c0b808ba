#!/usr/bin/env bash
# llama.cpp's own quantizer on the reference F32 GGUF: TYPE with or without an importance matrix
# (llama-imatrix on the shared calibration text, 512-token chunks, computed once).
#   bench/peers/peer_llamacpp.sh WORK TYPE imatrix|plain
set -euo pipefail
WORK=$1; TYPE=$2; MODE=$3
# bench/tools.py knows where `make bench-tools` put the binaries (or $LLAMA_BIN); it exits 1 naming the fix
BIN=$("${PYTHON:-python3}" "$(dirname "$0")/../tools.py" llama-bin)
if [ "$MODE" = imatrix ]; then
  if [ ! -f "$WORK/imatrix.dat" ]; then
    "$BIN/llama-imatrix" -m "$WORK/reference-f32.gguf" -f "$WORK/calib.txt" -c 512 -t 2 -o "$WORK/imatrix.dat.tmp" >"$WORK/imatrix.log" 2>&1
    mv "$WORK/imatrix.dat.tmp" "$WORK/imatrix.dat" 2>/dev/null || mv "$WORK/imatrix.dat.tmp.gguf" "$WORK/imatrix.dat"
  fi
  exec "$BIN/llama-quantize" --imatrix "$WORK/imatrix.dat" "$WORK/reference-f32.gguf" "$WORK/llamacpp-$TYPE-imatrix.gguf" "$TYPE" 2
else
  exec "$BIN/llama-quantize" "$WORK/reference-f32.gguf" "$WORK/llamacpp-$TYPE.gguf" "$TYPE" 2
fi
