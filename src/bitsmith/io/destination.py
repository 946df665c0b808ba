"""The destination rule: how bitsmith claims, fills and publishes a path it writes (``--out``).

Every output (a checkpoint folder, a GPTQ export folder, a ``.gguf`` file) goes through one
:class:`Destination`:

1. :meth:`Destination.check`, before any work: an existing path is refused unless ``overwrite`` is
   given, and even then only when it is an earlier bitsmith output of the same kind (recognised by
   its metadata, never by its name) and not a directory the user stands in (``.``, a parent of the
   current directory, the home directory, ``/``).
2. :meth:`Destination.stage`: takes a lock file next to the destination (``.NAME.bitsmith-lock``,
   ``fcntl.flock`` with the owner's pid inside), so a second concurrent writer is refused at once;
   removes temporary folders left by runs that died (``kill -9``); creates the temporary path
   ``.NAME.partial-<pid>-<random>`` the writer fills.
3. :meth:`Staging.publish`: the temporary path becomes the destination atomically. Without
   overwrite it is renamed with ``renameat2(RENAME_NOREPLACE)`` (Linux, via ctypes) so a path that
   appeared meanwhile is never clobbered; where that call is missing or the filesystem refuses it,
   a folder is renamed with ``os.rename`` after an existence check made under the lock, and a file
   is hard-linked (``os.link`` fails if the name exists) then unlinked. With overwrite, the old
   output is first renamed aside, the new one renamed in, and only then the old one deleted, so a
   failure in between puts the old one back and never leaves the user with neither.

The temporary path is removed on every exit path: an exception or KeyboardInterrupt (the caller's
``with``), SIGTERM (turned into SystemExit while a staging is live, when bitsmith runs in the main
thread and nobody else handles SIGTERM) and interpreter exit (atexit). Only ``kill -9`` escapes, and
the next run to the same destination cleans up after it.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

MARKER_FILE = "bitsmith.json"  # a checkpoint's report file; the marker of other bitsmith folders
MARKER_VERSION = 1
LEGACY_TEMP_AGE_S = 3600  # temp folders from before pids were recorded: removed after an idle hour


class DestinationError(ValueError):
    """An output path bitsmith will not write to; the message says what was found and what to do."""


def is_bitsmith_checkpoint(path: Path) -> bool:
    """A bitsmith checkpoint folder: its ``bitsmith.json`` says ``format: bitsmith`` (the writer's
    report, next to shards whose headers say the same)."""
    data = _read_marker(path)
    return data.get("format") == "bitsmith" and data.get("kind", "checkpoint") == "checkpoint"


def is_marked_output(kind: str) -> Callable[[Path], bool]:
    """A recogniser for folders that carry bitsmith's marker file with ``kind``."""

    def recognise(path: Path) -> bool:
        data = _read_marker(path)
        return data.get("written_by") == "bitsmith" and data.get("kind") == kind

    return recognise


def is_gguf_file(path: Path) -> bool:
    """A GGUF file (its magic); a single file the user named, so the magic is proof enough."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _read_marker(path: Path) -> dict:
    try:
        data = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class OutputKind:
    """What bitsmith writes at a destination and how an earlier one is recognised."""

    name: str
    noun: str  # in messages: "a bitsmith checkpoint"
    is_file: bool
    recognise: Callable[[Path], bool]
    writes_marker: bool  # publish adds the marker file (the writer itself leaves none)


KINDS: dict[str, OutputKind] = {
    "checkpoint": OutputKind("checkpoint", "a bitsmith checkpoint", False, is_bitsmith_checkpoint, False),
    "gptq-export": OutputKind("gptq-export", "a GPTQ export written by bitsmith", False, is_marked_output("gptq-export"), True),
    "gguf": OutputKind("gguf", "a GGUF file", True, is_gguf_file, False),
    "ct-export": OutputKind("ct-export", "a compressed-tensors export written by bitsmith", False, is_marked_output("ct-export"), True),
}


@dataclass(frozen=True)
class Destination:
    """An output path of ``kind`` (a key of :data:`KINDS`); ``error`` is the exception class raised
    for refusals, so each writer keeps its own error type (CheckpointError, GPTQError, ...)."""

    path: Path
    kind: str
    overwrite: bool = False
    error: type[Exception] = DestinationError

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown output kind {self.kind!r}; one of {', '.join(KINDS)}")
        object.__setattr__(self, "path", Path(self.path))

    @property
    def output(self) -> OutputKind:
        return KINDS[self.kind]

    def check(self) -> None:
        """Refuse, before any work, a path this run may not write; see the module docstring."""
        path = self.path
        if not os.path.lexists(path):
            return
        if not self.overwrite:
            raise self.error(f"{path} already exists; choose another --out or pass --overwrite")
        refusal = protected_reason(path) or self._foreign_reason()
        if refusal:
            raise self.error(f"--overwrite replaces only {self.output.noun}, and {path} {refusal}")

    def _foreign_reason(self) -> str | None:
        """Why the existing path is not an earlier output of this kind, or None when it is."""
        path, out = self.path, self.output
        if path.is_symlink():
            return "is a symbolic link; remove the link or choose another --out"
        if out.is_file:
            if path.is_dir():
                return "is a folder; choose a file name for --out"
            return None if out.recognise(path) else f"is not {out.noun}; delete it yourself or choose another --out"
        if not path.is_dir():
            return "is a file, not a folder; delete it yourself or choose another --out"
        entries = sorted(p.name for p in path.iterdir())
        if not entries or out.recognise(path):
            return None
        other = next((k for k in KINDS.values() if not k.is_file and k.recognise(path)), None)
        if other is not None:
            return f"is {other.noun}; delete it yourself or choose another --out"
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        return (f"is a folder bitsmith did not write (it holds {shown}); "
                "move what you need out of it and delete it, or choose another --out")

    def stage(self) -> "Staging":
        """Lock the destination, remove dead runs' leftovers and create the temporary path."""
        self.check()
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        lock = acquire_lock(lock_path(self.path), self.path, self.error)
        try:
            remove_stale_temps(self.path)  # may put back an output a killed run had moved aside
            self.check()  # again under the lock: another run may have finished meanwhile
            prefix = f".{self.path.name}.partial-{os.getpid()}-"
            if self.output.is_file:
                fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
                os.close(fd)
                tmp = Path(name)
            else:
                tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        except BaseException:
            release_lock(lock)
            raise
        return Staging(self, tmp, lock)


def protected_reason(path: Path) -> str | None:
    """Why ``path`` may never be replaced (it is ``/``, the home directory, or the current directory
    or one of its parents), or None."""
    real = Path(os.path.realpath(path))
    if real == Path(real.anchor):
        return "is the root of the file system; choose a new folder for --out"
    try:
        home = Path(os.path.realpath(Path.home()))
    except (RuntimeError, KeyError):  # no HOME and no password entry: there is no home to protect
        home = None
    if real == home:
        return "is your home directory; choose a new folder for --out"
    cwd = Path(os.path.realpath(os.getcwd()))
    if real == cwd or real in cwd.parents:
        where = "the current directory" if real == cwd else "a parent of the current directory"
        return f"is {where}; choose a new folder for --out"
    return None


# -- the lock ------------------------------------------------------------------------------------


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.bitsmith-lock")


@dataclass(frozen=True)
class Lock:
    path: Path
    fd: int


def acquire_lock(path: Path, target: Path, error: type[Exception]) -> Lock:
    """An exclusive ``flock`` on ``path`` with our pid inside; refused at once when another run holds it.

    The lock file is removed on release, so after locking we check that the file we hold is still
    the one at ``path`` (a run that released it meanwhile unlinked it) and retry otherwise."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise error(f"another bitsmith run (pid {owner}) is writing {target}; wait for it to finish "
                        "or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return Lock(path, fd)
        os.close(fd)


def release_lock(lock: Lock) -> None:
    try:
        os.unlink(lock.path)  # while still held: a run that opens it now retries on a fresh file
    except FileNotFoundError:
        pass
    os.close(lock.fd)


# -- leftovers of dead runs ----------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _owner_pid(name: str, marker: str) -> int | None:
    """The pid in ``.NAME.<marker>-<pid>-<random>``, or None for names written before pids were."""
    head, dash, _ = name.partition(marker)[2].partition("-")  # mkdtemp's random part has no "-"
    return int(head) if dash and head.isdigit() else None


def _idle_seconds(path: Path) -> float:
    """Seconds since anything directly in ``path`` (or ``path`` itself) changed."""
    try:
        times = [path.lstat().st_mtime]
        if path.is_dir() and not path.is_symlink():
            times += [p.lstat().st_mtime for p in path.iterdir()]
    except OSError:  # changing under us: certainly not idle
        return 0.0
    return time.time() - max(times)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove ``.NAME.partial-*`` leftovers of runs that died, and settle ``.NAME.replaced-*``
    (an old output moved aside by a run killed mid-swap: put back when the destination is missing,
    else removed). Called under the destination's lock, so no live bitsmith run owns them."""
    removed = []
    for marker in (".partial-", ".replaced-"):
        for item in sorted(path.parent.glob(f".{glob.escape(path.name)}{marker}*")):
            pid = _owner_pid(item.name, marker)
            if pid is not None and pid_alive(pid):
                continue
            if pid is None and (marker == ".replaced-" or _idle_seconds(item) < LEGACY_TEMP_AGE_S):
                continue  # possibly a live run of an older bitsmith, which took no lock
            if marker == ".replaced-" and not os.path.lexists(path):
                log.warning("restoring %s from %s, left by a run that stopped while replacing it", path, item)
                os.rename(item, path)
                continue
            log.info("removing %s, left by a bitsmith run that did not finish", item)
            _remove(item)
            removed.append(item)
    return removed


# -- publishing ----------------------------------------------------------------------------------

AT_FDCWD = -100
RENAME_NOREPLACE = 1


def renameat2_noreplace(src: Path, dst: Path) -> bool:
    """``renameat2(src, dst, RENAME_NOREPLACE)``; False when the call or the filesystem lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def move_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError rather than replacing anything at ``dst``."""
    if renameat2_noreplace(src, dst):
        return
    if os.path.lexists(dst):  # the fallbacks: checked under the destination's lock
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    if src.is_dir():
        os.rename(src, dst)  # refuses a non-empty folder at dst; the check above covers the rest
    else:
        os.link(src, dst)  # refuses any existing dst
        os.unlink(src)


_live: set["Staging"] = set()
_live_guard = threading.Lock()
_previous_sigterm: list = []  # the handler we replaced while stagings are live


def _on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: each writer's ``with`` removes its temporary path


def _discard_all_at_exit() -> None:
    for staging in list(_live):
        staging.discard()


atexit.register(_discard_all_at_exit)


def _track(staging: "Staging", live: bool) -> None:
    """Keep the set of live stagings; SIGTERM becomes SystemExit while it is not empty."""
    with _live_guard:
        was_empty = not _live
        if live:
            _live.add(staging)
        else:
            _live.discard(staging)
        main = threading.current_thread() is threading.main_thread()  # signal.signal works only there
        if live and was_empty and main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
            _previous_sigterm.append(signal.SIG_DFL)
        elif not live and not _live and main and _previous_sigterm:
            signal.signal(signal.SIGTERM, _previous_sigterm.pop())


class Staging:
    """A locked destination being written at :attr:`tmp`; :meth:`publish` or :meth:`discard` ends it.
    As a context manager, an exception discards it."""

    def __init__(self, destination: Destination, tmp: Path, lock: Lock) -> None:
        self.destination, self.tmp, self._lock = destination, tmp, lock
        self.done = False
        _track(self, True)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.done:
            self.discard()

    def discard(self) -> None:
        """Remove the temporary path and release the lock (idempotent)."""
        if self.done:
            return
        self.done = True
        try:
            _remove(self.tmp)
        finally:
            release_lock(self._lock)
            _track(self, False)

    def publish(self) -> Path:
        """Move the finished temporary path to the destination (see the module docstring)."""
        dest = self.destination
        try:
            if dest.output.writes_marker:
                marker = {"written_by": "bitsmith", "kind": dest.kind, "marker_version": MARKER_VERSION}
                (self.tmp / MARKER_FILE).write_text(json.dumps(marker, indent=1))
            if os.path.lexists(dest.path):
                self._replace()
            else:
                try:
                    move_noreplace(self.tmp, dest.path)
                except FileExistsError:
                    raise dest.error(f"{dest.path} appeared while this run was writing it and was left as it is; "
                                     "choose another --out and run again") from None
        except BaseException:
            self.discard()
            raise
        self.done = True
        release_lock(self._lock)
        _track(self, False)
        return dest.path

    def _replace(self) -> None:
        """--overwrite: old output aside, new one in, old one deleted; the old one back on failure."""
        dest = self.destination
        if not dest.overwrite:
            raise dest.error(f"{dest.path} appeared while this run was writing it and was left as it is; "
                             "choose another --out and run again")
        dest.check()  # what is there now must still be an earlier output of this kind
        if dest.output.is_file:
            os.replace(self.tmp, dest.path)  # one atomic step for a file: old or new, never neither
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{dest.path.name}.replaced-{os.getpid()}-", dir=dest.path.parent))
        os.rmdir(aside)  # only the unique name is wanted
        os.rename(dest.path, aside)
        try:
            move_noreplace(self.tmp, dest.path)
        except BaseException:
            os.rename(aside, dest.path)
            raise
        shutil.rmtree(aside, ignore_errors=True)
