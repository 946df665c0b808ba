"""Calibration token batches from local text.

docs/PROTOCOL.md's default is "128 sequences x 512 tokens from the start" of the calibration text: the
text is tokenized once (with the tokenizer's own BOS convention) and cut into consecutive,
non-overlapping windows. ``random_offsets=True`` instead draws window starts uniformly with a seeded
generator (windows may overlap), for texts whose start is unrepresentative.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
import logging
from pathlib import Path
from typing import Any

import torch

from bitsmith.io.textfile import read_text_file

log = logging.getLogger(__name__)

DEFAULT_CALIB_TEXT = "sotu_calibration.txt"  # shipped in bitsmith/data


def read_calibration_text(path: str | Path | None = None) -> str:
    """The text of ``path``, or the shipped State of the Union calibration text when None."""
    if path is None:
        from bitsmith.eval.suite import shipped_text

        return shipped_text(DEFAULT_CALIB_TEXT)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration text {p} does not exist; pass --calib with a readable text file")
    return read_text_file(p, "calibration text")


def calibration_batches(
    tokenizer: Any,
    text: str,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    *,
    random_offsets: bool = False,
) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` token ids, long [samples, seq_len].

    Consecutive windows from the start by default (``seed`` unused); with ``random_offsets``, window
    starts drawn with ``torch.Generator().manual_seed(seed)``. Deterministic either way.
    """
    from bitsmith.eval.perplexity import tokenize_text

    if samples < 1 or seq_len < 2:
        raise ValueError(f"need at least 1 calibration sample of at least 2 tokens, got {samples} x {seq_len}")
    ids = torch.tensor(tokenize_text(tokenizer, text), dtype=torch.long)  # [N]
    needed = seq_len if random_offsets else samples * seq_len
    if ids.numel() < needed:
        raise ValueError(
            f"calibration text has {ids.numel():,} tokens; {samples} x {seq_len} needs {needed:,}: "
            "give a longer --calib file or fewer --calib-samples"
        )
    if not random_offsets:
        return ids[: samples * seq_len].reshape(samples, seq_len).clone()  # [samples, seq_len]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=g)  # [samples]
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])  # [samples, seq_len]


def tokens_digest(calib: torch.Tensor) -> str:
    """A short content hash of a calibration tensor (shape and ids), to recognise it on resume."""
    data = calib.to(torch.int64).contiguous()
    h = hashlib.sha256(str(tuple(data.shape)).encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration tokens come from: a text file (None: the shipped text) and how to cut it."""

    text: Path | None = None
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    random_offsets: bool = False

    def batches(self, tokenizer: Any) -> torch.Tensor:
        """Token ids [samples, seq_len]."""
        return calibration_batches(tokenizer, read_calibration_text(self.text), self.samples, self.seq_len,
                                   self.seed, random_offsets=self.random_offsets)
