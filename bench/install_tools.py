"""Install the external tools the benchmarks compare against (`make bench-tools` runs this).

    python3 bench/install_tools.py                      # llama.cpp's tools and every peer venv
    python3 bench/install_tools.py --no-peers           # llama.cpp only
    python3 bench/install_tools.py --peers hqq,quanto   # a subset of the peers

Everything lands in the tools folder of bench/tools.py (``~/.cache/bitsmith/tools`` or
``$BITSMITH_TOOLS``), never in the repository:

- llama.cpp: the llama-cpp-python *source* package from PyPI vendors the whole llama.cpp tree; its
  command-line tools are built from it with cmake (``-j2`` under ``nice`` by default: 10-25
  minutes on 2 cores). No prebuilt binary exists for every CPU, and a source build tunes for this one.
- peers: one venv per library (their pins conflict with ours and with each other), each with torch
  held at the CPU wheel of constraints.txt so pip never pulls a multi-GB CUDA build. A peer that
  fails to install is reported and skipped; the others still install.

Idempotent: a finished step leaves a stamp naming what it installed, and a second run with the same
versions only checks the stamps (seconds). Standard library only, so any python3 runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import tools

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
STAMP = ".bitsmith-installed"
# Native build (-march=native) minus ggml's AMX kernels: on a VM whose CPU advertises AMX without
# running it they die of SIGILL at the first tile instruction (seen here: `tilezero` in
# tinygemm_kernel_amx), and the recorded results were measured without AMX. Undefining the macro
# compiles those kernels out; every other instruction set the CPU has stays on.
NO_AMX = "-U__AMX_INT8__"
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
               f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")


def run(cmd: list[str], log: Path | None = None) -> None:
    """Run a command; its output goes to `log` when given (build logs are long), else to ours."""
    print("  $", " ".join(cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True)
        return
    with log.open("a") as fh:
        result = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{cmd[0]} failed (exit {result.returncode}); last lines of {log}:\n{tail}")


def is_stamped(folder: Path, content: str) -> bool:
    stamp = folder / STAMP
    return stamp.is_file() and stamp.read_text() == content


def write_stamp(folder: Path, content: str) -> None:
    (folder / STAMP).write_text(content)


def fetch_llama_cpp(dest: Path, version: str) -> None:
    """Download the llama-cpp-python sdist and unpack only its vendor/llama.cpp tree into `dest`."""
    download = tools.tools_root() / "downloads"
    download.mkdir(parents=True, exist_ok=True)
    sdist = download / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", str(download)])
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix):
                member.name = member.name[len(prefix):]  # strip the sdist's folders: dest is the tree
                members.append(member)
        tar.extractall(staging, members=members, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)  # only a complete tree ever sits at dest


def install_llama_cpp(jobs: int) -> None:
    """Build llama.cpp's tools into tools.llama_bin_dir(); skipped when the stamp matches."""
    version = tools.LLAMA_CPP_PYTHON_VERSION
    src = tools.llama_cpp_dir()
    want = f"llama-cpp-python {version}: {' '.join(tools.LLAMA_TOOLS)}; {' '.join(CMAKE_FLAGS)}\n"
    if is_stamped(src, want) and all((tools.llama_bin_dir() / t).is_file() for t in tools.LLAMA_TOOLS):
        print(f"llama.cpp: already built in {tools.llama_bin_dir()}")
        return
    if not (src / "CMakeLists.txt").is_file():  # the tree arrives whole or not at all (fetch_llama_cpp)
        print(f"llama.cpp: fetching llama-cpp-python {version} source into {src}")
        fetch_llama_cpp(src, version)
    build = src / "build"
    log = src / "build.log"
    print(f"llama.cpp: building {', '.join(tools.LLAMA_TOOLS)} with -j{jobs} (log: {log})", flush=True)
    start = time.monotonic()
    run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], log)
    # nice: the build takes minutes of every core it is given; keep the machine usable meanwhile
    run(["nice", "-n", "10", "cmake", "--build", str(build), "-j", str(jobs), "--target", *tools.LLAMA_TOOLS], log)
    missing = [t for t in tools.LLAMA_TOOLS if not (tools.llama_bin_dir() / t).is_file()]
    if missing:
        raise RuntimeError(f"the build finished but {', '.join(missing)} is not in {tools.llama_bin_dir()}")
    write_stamp(src, want)
    print(f"llama.cpp: built in {time.monotonic() - start:.0f} s")


def peer_stamp(peer: tools.Peer) -> str:
    """What a finished venv records: the packages and the torch pin (a change to either reinstalls)."""
    pins = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()[:12]
    return f"{' '.join(peer.packages)}; constraints {pins}\n"


def install_peer(peer: tools.Peer) -> None:
    """Create the peer's venv with the pinned CPU torch, then its packages; skipped when stamped."""
    venv = tools.peer_dir(peer.name)
    if is_stamped(venv, peer_stamp(peer)):
        print(f"peer {peer.name}: already installed in {venv}")
        return
    print(f"peer {peer.name}: installing {' '.join(peer.packages)} into {venv}", flush=True)
    shutil.rmtree(venv, ignore_errors=True)  # a half-made venv from an interrupted run is not reused
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{peer.name}.log"
    log.unlink(missing_ok=True)
    run([sys.executable, "-m", "venv", str(venv)], log)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS)]
    # torch first and alone: with the pin in place the packages below cannot swap it for a CUDA build
    run([*pip, "torch==2.13.0"], log)
    run([*pip, *peer.packages], log)
    write_stamp(venv, peer_stamp(peer))


def install_peers(names: list[str]) -> dict[str, str]:
    """Install each named peer; returns name -> "ok" or the reason it was skipped."""
    outcome: dict[str, str] = {}
    for name in names:
        start = time.monotonic()
        try:
            install_peer(tools.PEERS[name])
            outcome[name] = f"ok ({time.monotonic() - start:.0f} s)"
        except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
            # one peer that cannot install on this machine must not stop the others
            outcome[name] = f"skipped: {str(exc).splitlines()[0]}"
            print(f"peer {name}: FAILED, skipped ({exc})", flush=True)
    return outcome


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp build")
    ap.add_argument("--no-peers", action="store_true", help="skip every peer venv")
    ap.add_argument("--peers", default=",".join(tools.PEERS),
                    help=f"comma-separated subset of {','.join(tools.PEERS)} (default: all)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for llama.cpp (default 2)")
    args = ap.parse_args(argv)
    unknown = [p for p in args.peers.split(",") if p and p not in tools.PEERS]
    if unknown:
        ap.error(f"unknown peer {', '.join(unknown)}; choose from {', '.join(tools.PEERS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(f"tools folder: {tools.tools_root()}")
    status = 0
    if not args.no_llama:
        try:
            install_llama_cpp(args.jobs)
        except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
            print(f"llama.cpp: FAILED ({exc})", file=sys.stderr)
            status = 1
    if not args.no_peers:
        outcome = install_peers([p for p in args.peers.split(",") if p])
        print("peers: " + "; ".join(f"{k} {v}" for k, v in outcome.items()))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
