#!/usr/bin/env bash
# llama.cpp checks of `bitsmith export --to gguf`: see bench/export_llamacpp.py (this wrapper keeps the old name).
exec "${PY:-.venv/bin/python}" "$(dirname "$0")/export_llamacpp.py" "$@"
