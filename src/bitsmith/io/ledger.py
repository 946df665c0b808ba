"""The finished output shards of a calibration-free (streaming) run, kept so an interrupted run continues.

The streaming quantizer writes a checkpoint shard by shard in file order. Each shard, once closed, is
made durable and moved into a work folder next to the output, ``<out>.partial/`` (the calibrated
path's work folder has the same name), and ``shards.json`` there is rewritten atomically to list it
with its tensors, their quantization entries and their report lines: that rewrite is the commit point.
A killed run leaves that folder behind; ``quantize --resume`` skips every source tensor whose outputs
are committed and continues with the next shard, whose boundaries are the same as an uninterrupted
run's (the writer's rule depends only on the tensors' sizes in order), so the result is the same file
for file. The folder is removed once the checkpoint is published.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

LEDGER_FILE = "shards.json"
CALIBRATED_MANIFEST = "manifest.json"  # the calibrated run's state file (pipeline.workstate)
LEDGER_VERSION = 1


class LedgerError(ValueError):
    """The work folder of an earlier run cannot be used as asked; the message says what to do."""


def ledger_dir(out_dir: Path) -> Path:
    """``<out>.partial``: where an unfinished run's committed work lives."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


@dataclass
class ShardLedger:
    """The committed shards of one run: ``shards`` in order, each ``{"file", "tensors", "specs", "reports"}``."""

    path: Path
    key: dict  # everything that must match for a resumed run to write the same checkpoint
    shards: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, out_dir: Path, key: dict, resume: bool) -> "ShardLedger":
        """The ledger for ``out_dir``: a fresh one, or with ``resume`` the earlier run's (which must
        have been started with the same ``key``). An unfinished run is never discarded silently."""
        path = ledger_dir(out_dir)
        ledger_file = path / LEDGER_FILE
        if (path / CALIBRATED_MANIFEST).exists():
            raise LedgerError(f"{path} holds an unfinished calibrated run; finish it with the same --calib settings "
                              "and --resume, or delete that folder to start over")
        if ledger_file.exists():
            data = cls._read(ledger_file)
            if not resume and data["shards"]:
                raise LedgerError(f"{path} holds an unfinished run ({len(data['shards'])} shard(s) done); pass "
                                  "--resume to continue it, or delete that folder to start over")
            if resume and data["key"] != key:
                raise LedgerError(f"cannot resume from {path}: it was started with different settings "
                                  f"({first_difference(data['key'], key)}); rerun with the same model, spec, method "
                                  "and options, or delete that folder to start over")
            if resume:
                ledger = cls(path, key, data["shards"])
                ledger._check_files()
                log.info("resuming after %d committed shard(s) in %s", len(ledger.shards), path)
                return ledger
            ledger_file.unlink()  # a ledger that committed nothing: nothing to keep
        elif resume:
            log.info("nothing to resume in %s; starting from the first tensor", path)
        return cls(path, key)  # the folder is made by the first commit: a run that commits nothing leaves nothing

    @staticmethod
    def _read(ledger_file: Path) -> dict:
        try:
            data = json.loads(ledger_file.read_text())
            if data.get("version") != LEDGER_VERSION or not isinstance(data.get("shards"), list):
                raise ValueError(f"version {data.get('version')!r}")
        except (ValueError, AttributeError, RecursionError) as exc:
            raise LedgerError(f"{ledger_file} is not a ledger this version of bitsmith reads ({exc}); delete "
                              f"{ledger_file.parent} to start over") from exc
        return data

    def _check_files(self) -> None:
        for shard in self.shards:
            if not (self.path / shard["file"]).is_file():
                raise LedgerError(f"{self.path} lists {shard['file']} but it is missing; delete {self.path} to start over")

    def names(self) -> set[str]:
        """Every tensor of the committed shards."""
        return {n for shard in self.shards for n in shard["tensors"]}

    def commit(self, shard: Path, tensors: list[str], specs: dict, reports: list[dict]) -> Path:
        """Make the closed shard file durable, move it into the work folder and record it; returns
        its new path. The shard counts as finished only once the ledger naming it is on disk."""
        _fsync(shard)
        self.path.mkdir(exist_ok=True)
        name = f"shard-{len(self.shards):05d}.safetensors"
        os.replace(shard, self.path / name)
        self.shards.append({"file": name, "tensors": tensors, "specs": specs, "reports": reports})
        self._write()
        return self.path / name

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _write(self) -> None:
        tmp = self.path / (LEDGER_FILE + ".tmp")
        with tmp.open("w") as f:
            json.dump({"version": LEDGER_VERSION, "key": self.key, "shards": self.shards}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path / LEDGER_FILE)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def first_difference(old: dict, new: dict) -> str:
    """The first setting (in name order) that differs between two run keys, as a message clause."""
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            return f"{k}: {old.get(k)!r} then, {new.get(k)!r} now"
    return "format version"
