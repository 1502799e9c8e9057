"""End to end on the real bundled models (kept to a few minutes on 2 cores)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bitplan.job.pipeline import run_pipeline
from bitplan.report.evaluation import perplexity, tokenize_for_perplexity
from bitplan.sources.calibration import builtin_text
from bitplan.spec import JobSpec
from bitplan.targets.artifact import load_artifact

pytestmark = pytest.mark.integration


@pytest.mark.slow  # the default suite's longest test (about 2 min alone): in .ci/run's slow subset
def test_smollm2_mixed_run_loads_and_evaluates(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    result = run_pipeline(JobSpec.from_flat(model="smollm2-135m", bits_per_weight=3.75, num_samples=2, seq_len=128),
                          out=tmp_path / "smollm2")
    assert result.status == "optimal"
    assert result.bits_per_weight <= 3.75 and len(result.units) == 210
    assert len({u["bits"] for u in result.units}) >= 2
    assert result.units[0]["name"] == "model.layers.0.self_attn.q_proj"
    model, tokenizer, manifest = load_artifact(Path(result.artifact))
    assert manifest.achieved.bytes == result.bytes
    ids = tokenize_for_perplexity(tokenizer, builtin_text()[:20000])
    ppl = perplexity(model, ids, seq_len=256, max_windows=2).ppl
    assert math.isfinite(ppl) and ppl < 200, ppl


def test_minilm_encoder_run(tmp_path: Path) -> None:
    result = run_pipeline(JobSpec.from_flat(model="minilm-l6", bits_per_weight=4.5, num_samples=2, seq_len=64),
                          out=tmp_path / "minilm")
    assert result.metric == "output_error" and len(result.units) == 36
    assert result.bits_per_weight <= 4.5
    model, tokenizer, _ = load_artifact(Path(result.artifact))
    batch = tokenizer(["bitplan quantizes networks"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).last_hidden_state).all()
