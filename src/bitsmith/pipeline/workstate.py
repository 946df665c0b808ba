"""The resumable state of a layer-wise run: a work folder next to the output (``<out>.partial/``).

It holds ``manifest.json`` (the run's settings, the calibration hash, the finished blocks and their
reports), one ``block-NNNN.safetensors`` per finished block (its tensors exactly as they go into
the checkpoint) and ``inputs-NNNN.bin``: the inputs of the first unfinished block, so a resumed run
recomputes nothing. The manifest is the commit point: it is replaced atomically after a block's
files are durable, and it names the inputs file it goes with.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitsmith.hadamard import ROTATION_PART, Rotation
from bitsmith.io.checkpoint import CheckpointError
from bitsmith.io.ledger import CALIBRATED_MANIFEST, first_difference
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

log = logging.getLogger(__name__)

MANIFEST = CALIBRATED_MANIFEST  # io.ledger refuses a streaming run over this file, so one name for both
STATE_VERSION = 1


@dataclass
class WorkState:
    path: Path
    key: dict  # everything that must match for a resume to be bit-identical
    done: int = 0  # finished blocks
    reports: list[list[dict]] = field(default_factory=list)  # per finished block

    @classmethod
    def open(cls, path: Path, key: dict, resume: bool) -> "WorkState":
        manifest = path / MANIFEST
        if not resume:
            if manifest.exists():
                done = json.loads(manifest.read_text()).get("done", 0)
                raise CheckpointError(
                    f"{path} holds an unfinished run ({done} block(s) done); pass --resume to continue it, "
                    "or delete that folder to start over"
                )
            shutil.rmtree(path, ignore_errors=True)  # debris of a run that never finished a block
            path.mkdir(parents=True)
            state = cls(path, key)
            state._write_manifest(None)
            return state
        if not manifest.exists():
            log.info("nothing to resume in %s; starting from the first block", path)
            return cls.open(path, key, resume=False)
        data = json.loads(manifest.read_text())
        if data.get("version") != STATE_VERSION or data.get("key") != key:
            diff = first_difference(data.get("key", {}), key)
            raise CheckpointError(
                f"cannot resume from {path}: it was started with different settings ({diff}); "
                "rerun with the same model, spec, method, options and calibration data, or delete "
                "that folder to start over"
            )
        return cls(path, key, int(data["done"]), data["reports"])

    def inputs_file(self, done: int) -> Path:
        return self.path / f"inputs-{done:04d}.bin"

    def block_file(self, index: int) -> Path:
        return self.path / f"block-{index:04d}.safetensors"

    def commit_block(self, index: int, tensors: dict[str, torch.Tensor], specs: dict[str, dict], reports: list[dict]) -> None:
        """Save block ``index``'s tensors; the caller has made ``inputs_file(index + 1)`` durable."""
        from bitsmith.io.checkpoint import write_safetensors

        assert index == self.done, (index, self.done)
        tmp = self.path / f"block-{index:04d}.tmp"
        write_safetensors(tmp, tensors, {"specs": json.dumps(specs)})
        tmp.replace(self.block_file(index))
        self.done, self.reports = index + 1, [*self.reports, reports]
        self._write_manifest(self.inputs_file(self.done))
        self.inputs_file(index).unlink(missing_ok=True)

    def commit_inputs(self) -> None:
        """Record that ``inputs_file(0)`` (the captured embeddings) is durable."""
        self._write_manifest(self.inputs_file(0))

    def has_inputs(self) -> bool:
        return self.inputs_file(self.done).exists() and json.loads((self.path / MANIFEST).read_text()).get("inputs") == self.inputs_file(self.done).name

    def load_block(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
        """Block ``index``'s plain tensors and quantized layers, as committed."""
        from safetensors import safe_open

        with safe_open(str(self.block_file(index)), framework="pt") as f:
            specs = json.loads(f.metadata()["specs"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        quantized = {}
        for module, info in specs.items():
            spec = QuantSpec.parse(info["spec"])
            parts = {p: tensors.pop(f"{module}.{p}", None) for p in ("qweight", "scale", "zero", "grid", ROTATION_PART)}
            rotation = None if "rotate" not in info else Rotation.from_state(
                parts[ROTATION_PART], info["shape"][1], info["rotate"]["block"])
            quantized[module] = QuantizedTensor.from_state(
                parts["qweight"], parts["scale"], parts["zero"], spec, info["shape"][1], parts["grid"], rotation
            )
        return tensors, quantized

    def _write_manifest(self, inputs: Path | None) -> None:
        data = {"version": STATE_VERSION, "key": self.key, "done": self.done, "reports": self.reports,
                "inputs": None if inputs is None else inputs.name}
        tmp = self.path / (MANIFEST + ".tmp")
        with tmp.open("w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path / MANIFEST)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

