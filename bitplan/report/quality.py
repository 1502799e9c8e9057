"""The quality report of a quantized language model, measured on text the calibration did not see: KL divergence
to the source model's next-token distribution (mean and 99th percentile per token), perplexity of the source and
of the quantized model on the same windows, and how often their most likely next token agrees.

The held-back text is by default the docstrings of a fixed list of standard-library modules (shipped with every
Python, no network), which the built-in calibration text (the language reference topics) does not contain."""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitplan.errors import BitplanError
from bitplan.sensitivity.kl import per_token_kl, swapped_weights
from bitplan.sources.calibration import read_text

HELDOUT_SOURCE = "builtin:python-stdlib-docstrings"
HELDOUT_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email.message", "fractions",
                   "http.client", "json", "logging", "pathlib", "shutil", "statistics", "string", "subprocess",
                   "tarfile", "textwrap", "threading", "unittest", "zipfile")


@dataclass(frozen=True)
class QualityReport:
    """Quality of the quantized model against its source on held-back windows (KL in nats per token)."""

    kl_mean: float
    kl_p99: float
    ppl: float
    ppl_source: float
    top1_agreement: float
    windows: int
    seq_len: int
    text: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def heldout_text() -> str:
    """The docstrings of :data:`HELDOUT_MODULES` and their public classes and functions, in a fixed order."""
    parts = []
    for name in HELDOUT_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attribute in sorted(vars(module)):
            member = getattr(module, attribute)
            if attribute.startswith("_") or getattr(member, "__module__", None) != name:
                continue
            if inspect.isclass(member) or inspect.isfunction(member):
                parts.append(inspect.getdoc(member) or "")
    return "\n\n".join(p for p in parts if p)


def heldout_windows(tokenizer: Any, *, windows: int, seq_len: int, text_file: Path | None = None
                    ) -> tuple[torch.Tensor, str]:
    """The first ``windows`` non-overlapping windows of ``seq_len`` tokens of the held-back text (or
    ``text_file``): ``(windows, seq_len)`` int64, and the text's name."""
    text = heldout_text() if text_file is None else read_text(text_file)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    available = ids.numel() // seq_len
    if available < 1:
        raise BitplanError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    count = min(windows, available)
    name = HELDOUT_SOURCE if text_file is None else str(text_file)
    return ids[: count * seq_len].reshape(count, seq_len), name


@torch.no_grad()
def measure_quality(model: nn.Module, units: dict[str, nn.Linear], replacements: dict[str, torch.Tensor],
                    windows: torch.Tensor, *, text: str) -> QualityReport:
    """Source model (as loaded) against the model with ``replacements`` swapped in, window by window."""
    tally = QualityTally()
    for window in torch.split(windows, 1):
        source = model(window).logits[0, :-1]
        with swapped_weights(units, replacements):
            quantized = model(window).logits[0, :-1]
        tally.add(source, quantized, window[0, 1:])
    return tally.report(windows, text=text)


class QualityTally:
    """KL, negative log-likelihoods and top-1 agreement summed window by window."""

    def __init__(self) -> None:
        self.kl_tokens: list[torch.Tensor] = []
        self.nll_source = self.nll_quantized = 0.0
        self.agree = 0

    def add(self, source_logits: torch.Tensor, quantized_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """One window: ``(positions, vocab)`` next-token logits of each model and the ``(positions,)`` tokens."""
        source = torch.log_softmax(source_logits.float(), dim=-1)
        quantized = torch.log_softmax(quantized_logits.float(), dim=-1)
        self.kl_tokens.append(per_token_kl(source, quantized).clamp_min(0.0))
        self.nll_source -= float(source.gather(1, targets[:, None]).sum())
        self.nll_quantized -= float(quantized.gather(1, targets[:, None]).sum())
        self.agree += int((source.argmax(-1) == quantized.argmax(-1)).sum())

    def report(self, windows: torch.Tensor, *, text: str) -> QualityReport:
        per_token = torch.cat(self.kl_tokens)
        count = per_token.numel()
        return QualityReport(kl_mean=float(per_token.mean()),
                             kl_p99=float(torch.quantile(per_token.double(), 0.99)),
                             ppl=math.exp(self.nll_quantized / count), ppl_source=math.exp(self.nll_source / count),
                             top1_agreement=self.agree / count, windows=windows.shape[0], seq_len=windows.shape[1],
                             text=text)
