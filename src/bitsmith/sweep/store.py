"""A sweep's results on disk, one file per finished variant, so a sweep resumes after a crash.

Layout of the ``--out`` folder::

    sweep.json                 the sweep's key (model identity, texts, windows, calibration)
    results/<variant>.json     one finished variant: written to a temporary name, flushed, then
                               renamed, so a file that exists is complete
    refcache/                  the reference's top-k statistics per domain (eval/refcache.py)
    checkpoints/<variant>/     quantized checkpoints (kept only with --keep-checkpoints)
    report.md, report.json, pareto.png

A folder that holds another sweep's key (another model, other texts or windows) is refused, so
results of different settings are never mixed in one report; variants may be added between runs.
Torch-free."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from bitsmith.sweep.config import SweepError

__all__ = ["ResultStore", "write_json_atomic"]

log = logging.getLogger(__name__)

MANIFEST = "sweep.json"


def write_json_atomic(path: Path, payload: Any) -> None:
    """``payload`` as JSON at ``path``: a temporary file in the same folder, fsynced, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResultStore:
    """The results folder of one sweep (see the module docstring)."""

    def __init__(self, folder: Path, key: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.key = key

    @classmethod
    def open(cls, folder: Path, key: dict[str, Any]) -> "ResultStore":
        """Open (or start) ``folder``; refuses a folder that holds another sweep or is not a sweep's."""
        folder = Path(folder)
        manifest = folder / MANIFEST
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text(encoding="utf-8"))["key"]
            except (ValueError, KeyError, TypeError) as exc:
                raise SweepError(f"{manifest} is corrupt ({exc}); delete the folder or choose another --out") from exc
            if old != key:
                diff = next(k for k in sorted(set(old) | set(key)) if old.get(k) != key.get(k))
                raise SweepError(f"{folder} holds a sweep with another {diff} ({old.get(diff)!r}, now {key.get(diff)!r}); "
                                 "its results cannot be mixed with these: choose another --out or delete that folder")
        elif folder.exists() and any(folder.iterdir()):
            raise SweepError(f"{folder} exists and is not a sweep folder (no {MANIFEST}); choose another --out")
        else:
            write_json_atomic(manifest, {"key": key})
        for stale in (folder / "results").glob(".*.tmp") if (folder / "results").is_dir() else ():
            stale.unlink(missing_ok=True)  # a crash between write and rename: never a result
        return cls(folder, key)

    def result_path(self, name: str) -> Path:
        return self.folder / "results" / f"{name}.json"

    def checkpoint_path(self, name: str) -> Path:
        return self.folder / "checkpoints" / name

    @property
    def cache_dir(self) -> Path:
        return self.folder / "refcache"

    def save(self, result: dict[str, Any]) -> Path:
        """Record one finished variant (``result["name"]``) atomically."""
        path = self.result_path(result["name"])
        write_json_atomic(path, {"key": self.key, "result": result})
        return path

    def load(self, name: str) -> dict[str, Any] | None:
        """The stored result of variant ``name``, or None when it has not finished (or is unreadable,
        which a re-run then repairs by running the variant again)."""
        path = self.result_path(name)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            log.warning("%s is unreadable; the variant runs again", path)
            return None
        if not isinstance(data, dict) or data.get("key") != self.key or not isinstance(data.get("result"), dict):
            log.warning("%s belongs to other settings; the variant runs again", path)
            return None
        return data["result"]

    def done(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """{name: result} of the given variants that have finished."""
        found = {n: self.load(n) for n in names}
        return {n: r for n, r in found.items() if r is not None}
