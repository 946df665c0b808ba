"""The destination rule (bitsmith.io.destination) as the writers use it: a second concurrent writer
is refused, nothing is ever clobbered, --overwrite replaces only an earlier bitsmith output of the same
kind, a failed swap keeps the old output, and temporary folders never outlive their run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitsmith.io import destination
from bitsmith.io.checkpoint import CheckpointError, CheckpointWriter
from bitsmith.io.destination import Destination, DestinationError
from bitsmith.io.export_gptq import GPTQError, export_gptq
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.spec import QuantSpec

from tests.tiny import make_tiny_model

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _write(out: Path, value: float, overwrite: bool = False) -> Path:
    """A small but real checkpoint whose one tensor is filled with ``value``."""
    with CheckpointWriter(out, "rtn", {}, overwrite=overwrite) as w:
        w.add_tensor("x", torch.full((4, 4), value))
        return w.finish()


def _value(out: Path) -> float:
    return float(load_file(out / "model.safetensors")["x"][0, 0])


def _debris(folder: Path) -> list[str]:
    """Temporary folders, lock files and moved-aside outputs left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _child(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_second_concurrent_writer_is_refused_and_first_output_intact(tmp_path: Path) -> None:
    out = tmp_path / "q"
    started, release = threading.Event(), threading.Event()
    result: list[Path] = []

    def first() -> None:
        with CheckpointWriter(out, "rtn", {}) as w:
            w.add_tensor("x", torch.full((4, 4), 1.0))
            started.set()
            release.wait(30)
            result.append(w.finish())

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(30)
        with pytest.raises(CheckpointError, match=rf"another bitsmith run \(pid {os.getpid()}\) is writing .*q"):
            CheckpointWriter(out, "rtn", {})
        with pytest.raises(CheckpointError, match="another bitsmith run"):  # --overwrite does not break a lock
            CheckpointWriter(out, "rtn", {}, overwrite=True)
    finally:
        release.set()
        thread.join(30)
    assert result == [out] and _value(out) == 1.0
    assert _debris(tmp_path) == []


def test_writer_in_another_process_is_named_by_pid(tmp_path: Path) -> None:
    out = tmp_path / "q"
    holder = _child("import sys; from bitsmith.io.destination import Destination\n"
                    "s = Destination(sys.argv[1], 'checkpoint').stage(); print('ready', flush=True)\n"
                    "sys.stdin.read(); s.discard()", str(out))
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(CheckpointError, match=rf"another bitsmith run \(pid {holder.pid}\) is writing"):
            CheckpointWriter(out, "rtn", {})
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0 and _debris(tmp_path) == []


def test_checkpoint_that_appeared_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "q"
    late = CheckpointWriter(out, "rtn", {})  # starts while --out does not exist yet
    late.add_tensor("x", torch.full((4, 4), 2.0))
    _write(tmp_path / "other", 1.0)
    os.rename(tmp_path / "other", out)  # a finished checkpoint lands at --out meanwhile
    with pytest.raises(CheckpointError, match="appeared while this run was writing"):
        with late:
            late.finish()
    assert _value(out) == 1.0
    assert _debris(tmp_path) == []
    with pytest.raises(CheckpointError, match="already exists; choose another --out or pass --overwrite"):
        _write(out, 3.0)
    assert _value(out) == 1.0


def test_overwrite_refuses_a_folder_bitsmith_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("my notes")
    with pytest.raises(CheckpointError, match=r"did not write \(it holds todo.txt\)"):
        _write(out, 1.0, overwrite=True)
    assert (out / "todo.txt").read_text() == "my notes"
    assert _debris(tmp_path) == []
    (tmp_path / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        _write(tmp_path / "model.safetensors", 1.0, overwrite=True)
    assert (tmp_path / "model.safetensors").read_bytes() == b"not a checkpoint"


def test_overwrite_refuses_current_directory_and_its_parents(tmp_path: Path, monkeypatch) -> None:
    cwd = tmp_path / "work" / "sub"
    cwd.mkdir(parents=True)
    (cwd / "keep.txt").write_text("x")
    monkeypatch.chdir(cwd)
    for out, where in ((Path("."), "the current directory"), (Path(".."), "a parent of the current directory"),
                       (tmp_path / "work", "a parent of the current directory")):
        with pytest.raises(CheckpointError, match=f"is {where}"):
            CheckpointWriter(out, "rtn", {}, overwrite=True)
    # even when the current directory is an earlier checkpoint
    _write(tmp_path / "ck", 1.0)
    monkeypatch.chdir(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="is the current directory"):
        CheckpointWriter(Path("."), "rtn", {}, overwrite=True)
    assert (cwd / "keep.txt").read_text() == "x" and _value(tmp_path / "ck") == 1.0
    assert sorted(p.name for p in cwd.iterdir()) == ["keep.txt"] and _debris(tmp_path / "work") == []
    for path, what in ((Path("/"), "root of the file system"), (Path.home(), "home directory")):
        with pytest.raises(DestinationError, match=what):
            Destination(path, "checkpoint", overwrite=True).check()


def test_overwrite_replaces_an_earlier_checkpoint_and_a_failed_swap_keeps_it(tmp_path: Path, monkeypatch) -> None:
    out = _write(tmp_path / "q", 1.0)

    def broken_rename(src: Path, dst: Path) -> None:
        raise OSError(5, "Input/output error (simulated)")

    with monkeypatch.context() as m:  # the new folder cannot be moved in: the old one must survive
        m.setattr(destination, "move_noreplace", broken_rename)
        m.setattr(os, "replace", lambda src, dst: broken_rename(src, dst) if Path(dst) == out else os.rename(src, dst))
        with pytest.raises(OSError, match="simulated"):
            _write(out, 2.0, overwrite=True)
    assert _value(out) == 1.0 and _debris(tmp_path) == []
    assert _write(out, 2.0, overwrite=True) == out
    assert _value(out) == 2.0 and json.loads((out / "bitsmith.json").read_text())["format"] == "bitsmith"
    assert _debris(tmp_path) == []


def test_exception_or_sigterm_mid_write_leaves_no_temp_folder(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "q", "rtn", {}) as w:
            w.add_tensor("x", torch.ones(4, 4))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    writer = _child("import sys, time, torch; from bitsmith.io.checkpoint import CheckpointWriter\n"
                    "with CheckpointWriter(sys.argv[1], 'rtn', {}) as w:\n"
                    "    w.add_tensor('x', torch.ones(64, 64)); print('ready', flush=True); time.sleep(60)",
                    str(tmp_path / "q"))
    try:
        assert writer.stdout.readline().strip() == "ready"
        assert any(n.startswith(".q.partial-") for n in _debris(tmp_path))
        writer.send_signal(signal.SIGTERM)
        assert writer.wait(30) == 128 + signal.SIGTERM
    finally:
        writer.kill()
        writer.communicate(timeout=30)
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_stale_temp_folders_of_dead_runs_are_removed_by_the_next_run(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale = tmp_path / f".q.partial-{dead}-abc123"  # what kill -9 leaves
    stale.mkdir()
    (stale / "shard-00000.safetensors.data").write_bytes(b"\0" * 1024)
    legacy = tmp_path / ".q.partial-k2j4_x9"  # an older bitsmith's name, without a pid, idle for 2 hours
    legacy.mkdir()
    (legacy / "shard-00000.safetensors.data").write_bytes(b"\0")
    for p in (legacy / "shard-00000.safetensors.data", legacy):
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    live = tmp_path / f".q.partial-{os.getpid()}-live01"  # a live run's: kept
    live.mkdir()
    other = tmp_path / f".other.partial-{dead}-abc123"  # another destination's: not ours to judge
    other.mkdir()
    _write(tmp_path / "q", 1.0)
    assert not stale.exists() and not legacy.exists()
    assert live.exists() and other.exists()
    # an old checkpoint moved aside by a run killed mid-swap is put back when --out is missing
    os.rename(tmp_path / "q", tmp_path / f".q.replaced-{dead}-zz")
    _write(tmp_path / "r", 2.0)  # another destination: leaves it alone
    assert (tmp_path / f".q.replaced-{dead}-zz").exists()
    with pytest.raises(CheckpointError, match="already exists"):
        _write(tmp_path / "q", 3.0)  # restored under the lock, then refused without --overwrite
    assert _value(tmp_path / "q") == 1.0


def test_quantize_and_gptq_export_follow_the_rule(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "tiny")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes")
    config = QuantizePlan(QuantSpec.parse("w4g32"))
    with pytest.raises(CheckpointError, match="did not write"):
        quantize(src, notes, config, overwrite=True)
    ck = quantize(src, tmp_path / "ck", config)
    with pytest.raises(GPTQError, match="did not write"):
        export_gptq(ck, notes, overwrite=True)
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    with pytest.raises(GPTQError, match="replaces only a GPTQ export written by bitsmith, .* is a bitsmith checkpoint"):  # a checkpoint is not an export
        export_gptq(ck, ck, overwrite=True)
    export_gptq(ck, tmp_path / "gptq")
    export_gptq(ck, tmp_path / "gptq", overwrite=True)  # an earlier export: replaced
    assert json.loads((tmp_path / "gptq" / "bitsmith.json").read_text())["kind"] == "gptq-export"
    assert _debris(tmp_path) == []


def test_single_file_destination(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    with Destination(out, "gguf").stage() as staging:
        staging.tmp.write_bytes(b"GGUF new")
        assert staging.publish() == out
    with pytest.raises(DestinationError, match="already exists"):
        Destination(out, "gguf").stage()
    notes = tmp_path / "notes.gguf"
    notes.write_text("mine")
    with pytest.raises(DestinationError, match="is not a GGUF file"):
        Destination(notes, "gguf", overwrite=True).check()
    with Destination(out, "gguf", overwrite=True).stage() as staging:
        staging.tmp.write_bytes(b"GGUF newer")
        late = Destination(tmp_path / "late.gguf", "gguf").stage()
        (tmp_path / "late.gguf").write_text("appeared")
        with pytest.raises(DestinationError, match="appeared while this run"):
            late.publish()
        staging.publish()
    assert out.read_bytes() == b"GGUF newer" and (tmp_path / "late.gguf").read_text() == "appeared"
    assert _debris(tmp_path) == []


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
def test_move_noreplace_never_replaces(tmp_path: Path, monkeypatch, renameat2: bool) -> None:
    if not renameat2:  # where the call or the filesystem lacks it: os.rename / os.link under the lock
        monkeypatch.setattr(destination, "renameat2_noreplace", lambda src, dst: False)
    (tmp_path / "new").mkdir()
    (tmp_path / "new.txt").write_text("new")
    (tmp_path / "empty").mkdir()  # plain os.rename would replace an empty folder
    (tmp_path / "old.txt").write_text("old")  # and os.rename a file
    for src, dst in (("new", "empty"), ("new.txt", "old.txt"), ("new", "old.txt")):
        with pytest.raises(FileExistsError):
            destination.move_noreplace(tmp_path / src, tmp_path / dst)
    assert (tmp_path / "old.txt").read_text() == "old" and (tmp_path / "new").is_dir()
    destination.move_noreplace(tmp_path / "new", tmp_path / "moved")
    destination.move_noreplace(tmp_path / "new.txt", tmp_path / "moved.txt")
    assert (tmp_path / "moved").is_dir() and (tmp_path / "moved.txt").read_text() == "new"
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.txt").exists()
