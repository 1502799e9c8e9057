"""Perplexity with the standard protocol: rows joined by a blank line, non-overlapping windows, mean token NLL."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitplan.stages import Stage

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    tokens: int
    windows: int
    seq_len: int

    def to_json(self) -> dict[str, float | int]:
        return {"ppl": self.ppl, "tokens": self.tokens, "windows": self.windows, "seq_len": self.seq_len}


def tokenize_for_perplexity(tokenizer: Any, text: str) -> torch.Tensor:
    """Join the text's rows (lines) with ``"\\n\\n"`` and tokenize once: ``(n_tokens,)`` int64."""
    joined = "\n\n".join(text.splitlines())
    return torch.tensor(tokenizer(joined)["input_ids"], dtype=torch.int64)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    *,
    seq_len: int,
    max_windows: int | None = None,
    on_progress: ProgressFn | None = None,
) -> PerplexityResult:
    """``exp`` of the mean next-token NLL over the first ``max_windows`` non-overlapping windows of ``seq_len``."""
    n_windows = token_ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"the text has {token_ids.numel()} tokens, fewer than one window of {seq_len}")
    total_nll = 0.0
    for index in range(n_windows):
        window = token_ids[index * seq_len : (index + 1) * seq_len].unsqueeze(0)
        logits = model(window).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        total_nll += float(nll)
        if on_progress is not None:
            on_progress(Stage.PERPLEXITY, index + 1, n_windows)
    return PerplexityResult(ppl=math.exp(total_nll / n_windows), tokens=n_windows * seq_len, windows=n_windows,
                            seq_len=seq_len)


def artifact_perplexity(path: Path, text: str, *, seq_len: int, max_windows: int | None = None,
                        on_progress: ProgressFn | None = None) -> PerplexityResult:
    """Load the artifact at ``path`` and measure its perplexity on ``text``."""
    from bitplan.targets.artifact import load_artifact

    model, tokenizer, _ = load_artifact(path)
    return perplexity(model, tokenize_for_perplexity(tokenizer, text), seq_len=seq_len, max_windows=max_windows,
                      on_progress=on_progress)
