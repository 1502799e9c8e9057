"""The quality report on held-back text (issue 14, finding 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitplan.job.pipeline import run_pipeline
from bitplan.report.quality import heldout_text, heldout_windows, measure_quality
from bitplan.sources.calibration import builtin_text
from bitplan.sources.models import load_model
from bitplan.sources.units import find_units
from bitplan.spec import JobSpec

KEYS = {"kl_mean", "kl_p99", "ppl", "ppl_source", "top1_agreement", "windows", "seq_len", "text"}


def test_issue14_heldout_text_is_not_in_the_calibration_text() -> None:
    calibration = builtin_text()
    paragraphs = [p for p in heldout_text().split("\n\n") if len(p) > 80]
    assert len(paragraphs) > 100 and not any(p in calibration for p in paragraphs)


def test_issue14_quality_of_the_source_itself_is_perfect(tiny_llama_dir: Path) -> None:
    loaded = load_model(str(tiny_llama_dir))
    units = find_units(loaded.model)
    windows, name = heldout_windows(loaded.tokenizer, windows=2, seq_len=32)
    same = measure_quality(loaded.model, units, {n: m.weight.detach().clone() for n, m in units.items()}, windows,
                           text=name)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    assert same.ppl == pytest.approx(same.ppl_source) and same.windows == 2 and same.seq_len == 32
    noisy = measure_quality(loaded.model, units, {n: m.weight + 0.5 * torch.randn_like(m.weight)
                                                  for n, m in units.items()}, windows, text=name)
    assert noisy.kl_mean > 0 and noisy.kl_p99 >= noisy.kl_mean and noisy.top1_agreement < 1.0


def test_issue14_every_run_and_manifest_has_a_quality_report(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=3.5, num_samples=2, seq_len=32,
                             group_size=64, quality_windows=2, quality_seq_len=64)
    result = run_pipeline(spec, out=tmp_path / "a")
    assert set(result.quality) == KEYS and result.quality["text"] == "builtin:python-stdlib-docstrings"
    assert result.quality["windows"] == 2 and result.quality["kl_mean"] > 0
    manifest = json.loads((Path(result.artifact) / "manifest.json").read_text())
    assert manifest["quality"] == result.quality
