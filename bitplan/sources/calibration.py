"""Calibration data: token windows from a text file or from a built-in default that needs no network."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitplan.errors import BitplanError

BUILTIN_SOURCE = "builtin:python-docs"


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows ``tokens (num_samples, seq_len) int64`` and the sha256 of exactly those tokens."""

    tokens: torch.Tensor
    sha256: str
    source: str

    def batches(self, batch_size: int = 1) -> list[torch.Tensor]:
        return list(torch.split(self.tokens, batch_size))


def builtin_text() -> str:
    """English prose shipped with Python itself (the language reference topics of ``pydoc_data``)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(path: Path) -> str:
    """Read a UTF-8 text file, with an error that names the file."""
    if not path.is_file():
        raise BitplanError(f"calibration/evaluation text file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BitplanError(f"text file {path} is not UTF-8 text ({error})") from None


def build_calibration_set(
    tokenizer: Any, *, text_file: Path | None, num_samples: int, seq_len: int, seed: int = 0
) -> CalibrationSet:
    """Tokenize the text once and draw ``num_samples`` random windows of ``seq_len`` tokens (seeded)."""
    if num_samples < 1 or seq_len < 2:
        raise BitplanError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples} and {seq_len}")
    text = builtin_text() if text_file is None else read_text(text_file)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    if ids.numel() < seq_len:
        raise BitplanError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=generator)
    tokens = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    digest = hashlib.sha256(tokens.to(torch.int32).numpy().tobytes()).hexdigest()
    return CalibrationSet(tokens=tokens, sha256=digest, source=BUILTIN_SOURCE if text_file is None else str(text_file))
