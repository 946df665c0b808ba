"""Where the benchmarks find the programs bitsmith is compared against.

Peers (llama.cpp's command-line tools, and quantization libraries whose pins conflict with ours and
with each other) live outside the repository, under one cache folder that `make bench-tools`
fills (bench/install_tools.py). Every bench script asks this module for a path instead of
hard-coding one, so a fresh clone on any machine runs the same commands.

Layout under the tools folder (default ``~/.cache/bitsmith/tools``, or ``$BITSMITH_TOOLS``)::

    llama.cpp/              llama.cpp's source tree, vendored by the llama-cpp-python sdist
    llama.cpp/build/bin/    llama-quantize, llama-imatrix, llama-perplexity, llama-bench, llama-simple,
                            llama-completion, llama-server
    peers/<name>/           one virtual environment per peer library (bin/python)

Per-tool overrides, for a tool built or installed elsewhere: ``BITSMITH_LLAMA_CPP`` (the source
tree), ``LLAMA_BIN`` (the folder holding the binaries) and ``BITSMITH_PEER_<NAME>`` (a peer's venv,
e.g. ``BITSMITH_PEER_HQQ``).

Also a tiny command line for shell scripts, which exits 1 with the fix when a tool is missing::

    python3 bench/tools.py llama-bin            # prints the folder holding llama.cpp's binaries
    python3 bench/tools.py llama-cpp            # prints llama.cpp's source tree
    python3 bench/tools.py peer-python hqq      # prints the peer venv's interpreter

Standard library only: the installer and the shell scripts run it with any python3.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

TOOLS_ENV = "BITSMITH_TOOLS"
DEFAULT_TOOLS = Path("~/.cache/bitsmith/tools")
INSTALL_HINT = "run `make bench-tools` from the repository root (or set {env} to an existing install)"

# The llama.cpp the recorded results were measured with: the tree vendored by this sdist.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# llama-simple: the smallest generator, which bench/export_llamacpp.py uses to check an exported file;
# llama-completion: the interactive/one-shot generator; llama-server: the OpenAI-compatible server that
# bench/serve_load.py and bench/probe_ladder.py measure against (its build, web UI included, adds about
# 40 minutes on 2 shared cores). llama-cli is left out.
LLAMA_TOOLS = (
    "llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-simple", "llama-completion",
    "llama-server",
)


@dataclass(frozen=True)
class Peer:
    """A peer quantization library installed into its own virtual environment."""

    name: str  # folder name under peers/ and the suffix of its BITSMITH_PEER_<NAME> override
    packages: tuple[str, ...]  # what pip installs beside the pinned torch
    note: str = ""  # what it is used for, printed by the installer

    @property
    def env_var(self) -> str:
        return f"BITSMITH_PEER_{self.name.upper().replace('-', '_')}"


# Package sets from what installs and runs on a CPU-only machine (each needs transformers to load the
# reference folder; gptqmodel also needs optimum because transformers 5 refuses GPTQ without it).
PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("hqq", ("hqq", "transformers", "accelerate", "safetensors"), "bench/peers/peer_hqq.py"),
        Peer("quanto", ("optimum-quanto", "transformers", "accelerate", "safetensors"), "bench/peers/peer_quanto.py"),
        Peer("llmc", ("llmcompressor", "transformers", "accelerate", "safetensors"), "bench/peers/peer_llmc.py"),
        Peer("gptqmodel", ("gptqmodel", "transformers", "accelerate", "safetensors", "optimum"),
             "bench/export_gptq_peer.py"),
        Peer("autoround", ("auto-round", "transformers", "accelerate", "safetensors"), "no bench script yet"),
    )
}


class ToolMissing(FileNotFoundError):
    """A benchmark needs an external tool that is not installed; the message names the fix."""


def tools_root() -> Path:
    """The cache folder holding every external tool: ``$BITSMITH_TOOLS`` or ~/.cache/bitsmith/tools."""
    return Path(os.environ.get(TOOLS_ENV) or DEFAULT_TOOLS).expanduser()


def llama_cpp_dir() -> Path:
    """llama.cpp's source tree (its convert_hf_to_gguf.py and gguf-py live here); not checked."""
    override = os.environ.get("BITSMITH_LLAMA_CPP")
    return Path(override).expanduser() if override else tools_root() / "llama.cpp"


def llama_bin_dir() -> Path:
    """The folder holding llama.cpp's binaries; not checked (see `llama_bin`)."""
    override = os.environ.get("LLAMA_BIN")
    return Path(override).expanduser() if override else llama_cpp_dir() / "build" / "bin"


def peer_dir(name: str) -> Path:
    """A peer's virtual environment folder; not checked (see `peer_python`)."""
    peer = PEERS[name]
    override = os.environ.get(peer.env_var)
    return Path(override).expanduser() if override else tools_root() / "peers" / name


def llama_bin(name: str) -> Path:
    """The path of one llama.cpp binary (e.g. "llama-quantize"), or ToolMissing naming the fix."""
    path = llama_bin_dir() / name
    if not path.is_file():
        raise ToolMissing(f"llama.cpp's {name} is not at {path}; " + INSTALL_HINT.format(env="LLAMA_BIN"))
    return path


def llama_script(name: str) -> Path:
    """A script from llama.cpp's source tree (e.g. "convert_hf_to_gguf.py"), or ToolMissing."""
    path = llama_cpp_dir() / name
    if not path.is_file():
        raise ToolMissing(f"llama.cpp's {name} is not at {path}; "
                          + INSTALL_HINT.format(env="BITSMITH_LLAMA_CPP"))
    return path


def peer_python(name: str) -> Path:
    """The interpreter of a peer's venv (a name in PEERS), or ToolMissing naming the fix."""
    path = peer_dir(name) / "bin" / "python"
    if not path.is_file():
        raise ToolMissing(f"the {name} peer environment is not at {path.parent.parent}; "
                          + INSTALL_HINT.format(env=PEERS[name].env_var))
    return path


def main(argv: list[str]) -> int:
    """`python3 bench/tools.py llama-bin | llama-cpp | peer-python NAME`: print a path or the fix."""
    try:
        if argv == ["llama-bin"]:
            print(llama_bin("llama-quantize").parent)
        elif argv == ["llama-cpp"]:
            print(llama_script("convert_hf_to_gguf.py").parent)
        elif len(argv) == 2 and argv[0] == "peer-python" and argv[1] in PEERS:
            print(peer_python(argv[1]))
        else:
            print(f"usage: tools.py llama-bin | llama-cpp | peer-python {{{','.join(PEERS)}}}", file=sys.stderr)
            return 2
    except ToolMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
