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
# the built-in mixed calibration text (a --calib value): the shipped prose and Python source in turns
PROSE_CODE = "prose+code"
PROSE = "prose"  # the State of the Union text by name (what None means for every method but AWQ)
# the code half: installed Python standard library modules, none of them in the evaluation's code domain
# (eval.domains.STDLIB_FILES; tests/calib holds the two texts apart)
CALIB_STDLIB_FILES = ("argparse.py", "difflib.py", "dataclasses.py", "enum.py", "configparser.py", "ipaddress.py")
MIX_CHUNK_CHARS = 1200  # ~300 tokens: every 512-token calibration window holds both kinds of text


def read_calibration_text(path: str | Path | None = None) -> str:
    """The text of ``path``; the shipped State of the Union calibration text when None or ``"prose"``;
    the built-in prose + code mix (:func:`mixed_calibration_text`) for ``"prose+code"``. A file of
    either name in the current directory is read as a file instead."""
    if path is None or (str(path) == PROSE and not Path(path).exists()):
        from bitsmith.eval.suite import shipped_text

        return shipped_text(DEFAULT_CALIB_TEXT)
    if str(path) == PROSE_CODE and not Path(path).exists():
        return mixed_calibration_text()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration text {p} does not exist; pass --calib with a readable text file")
    return read_text_file(p, "calibration text")


def text_chunks(text: str, size: int, sep: str = "\n") -> list[str]:
    """``text`` cut after the first ``sep`` at or past every ``size`` characters (line ends for code;
    spaces for the prose, whose paragraphs are single lines of up to 26,000 characters); the pieces
    join back to ``text``."""
    chunks, start = [], 0
    while start < len(text):
        end = text.find(sep, start + size)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    return chunks


def interleave(first: list[str], second: list[str]) -> str:
    """first[0] second[0] first[1] second[1] ..., blank lines between, until either list runs out (so
    the mix stays even)."""
    return "\n\n".join(a.strip() + "\n\n" + b.strip() for a, b in zip(first, second)) + "\n"


def mixed_calibration_text(chunk_chars: int = MIX_CHUNK_CHARS) -> str:
    """The shipped State of the Union text and Python source (:data:`CALIB_STDLIB_FILES` of the
    installed standard library) in alternating pieces of ~``chunk_chars`` characters (cut at spaces
    and line ends).

    A code model serves code as well as prose; on Qwen2.5-Coder-1.5B AWQ calibrated on prose alone left
    the code KLD above RTN's (bench/results/calibrated-methods, sessions 12 and 13)."""
    from bitsmith.eval.domains import stdlib_text
    from bitsmith.eval.suite import shipped_text

    code, used = stdlib_text(10**7, CALIB_STDLIB_FILES)
    if not used:
        raise FileNotFoundError(f"none of the Python sources {', '.join(CALIB_STDLIB_FILES)} is installed, so the "
                                f"{PROSE_CODE!r} calibration text cannot be built; pass --calib with a text file")
    return interleave(text_chunks(shipped_text(DEFAULT_CALIB_TEXT), chunk_chars, " "), text_chunks(code, chunk_chars))


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
