"""Issue 41 on real shapes: the streamed token pass equals the whole-model pass on SmolLM2-135M, and a
random-weight bf16 folder at Llama-3.2-1B's shape streams through the measuring half of the gguf job in a bounded
memory (``bench/scale.py``'s child, in a process of its own)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bitplan.sensitivity.request import Metric, SensitivityRequest
from bitplan.sensitivity.streamed import streamed_token_fisher
from bitplan.sensitivity.token_fisher import token_fisher
from bitplan.sources.models import (
    causal_lm_loss,
    causal_lm_sampled_loss,
    load_model,
    sampled_loss_of_logits,
    text_loss_of_logits,
)
from bitplan.sources.stream import Boundaries, DecoderStream, resident_model
from bitplan.sources.units import find_units
from tests.stream.test_streamed_sensitivity import assert_terms_close

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_issue41_streamed_token_taylor_kl_equals_whole_model_on_smollm2() -> None:
    """SmolLM2's 210 units at two RTN widths, two windows of 128 (the second without the curvature pass), float32
    products: every term within 1e-4 of the whole-model backward's (relative to the unit's largest)."""
    from bitplan.sources.calibration import build_calibration_set

    loaded = load_model("smollm2-135m")
    units = find_units(loaded.model)
    tokens = build_calibration_set(loaded.tokenizer, text_file=None, num_samples=2, seq_len=128, seed=0).tokens
    batches = list(torch.split(tokens, 1))
    request = SensitivityRequest(Metric.TOKEN_TAYLOR_KL, bits_options=(3, 4), group_size=64, precision="float32",
                                 curvature_stride=2)
    whole = token_fisher(loaded.model, units, batches, request, loss_fn=causal_lm_loss,
                         curvature_loss_fn=causal_lm_sampled_loss)
    with Boundaries(0) as boundaries:  # every boundary through a memory-mapped file
        streamed = streamed_token_fisher(DecoderStream(resident_model(loaded.model)), units, batches, boundaries,
                                         request, loss=text_loss_of_logits, curvature_loss=sampled_loss_of_logits)
    assert_terms_close(streamed, whole)


@pytest.mark.slow
def test_issue41_llama_1b_shape_streams_in_under_3_gib(tmp_path: Path) -> None:
    """``bitplan run --model FOLDER --bpw 5 --target gguf --formats Q4_K,Q6_K,Q8_0`` on a 1.07B-parameter bf16
    folder (2.0 GiB on disk; its float32 weights alone would be 4.0 GiB), two windows of 128 tokens: the streamed
    job, with the process tree's peak resident memory under 3 GiB, and a GGUF that llama.cpp loads and decodes.
    Three candidate types instead of the default ten: encoding every candidate of every layer is most of the job
    at this size (the default ten took 1,254 s of sensitivity on shared cores, bench/results/scale-1b-*)."""
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    assert spec is not None and spec.loader is not None
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        scale = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(scale)
        folder = scale.write_random_folder(tmp_path / "llama-1b", "1b")
        result = scale.run_child(folder, windows=2, seq_len=128, bpw=5.0, out=tmp_path / "out", quality_windows=1,
                                 formats="Q4_K,Q6_K,Q8_0")
        decoded = scale.llama_cpp_decodes(Path(result["gguf"]), tokens=4)
    finally:  # the bench takes its own folder off the path when it loads (_own_folder_off_path)
        if str(ROOT / "bench") in sys.path:
            sys.path.remove(str(ROOT / "bench"))
    assert result["parameters"] > 1.0e9
    assert result["status"] == "optimal"
    assert result["units"] == 16 * 7 and 4.5 < result["bits_per_weight"] <= 5.0
    assert set(result["types_chosen"]) <= {"Q4_K", "Q6_K", "Q8_0"}
    assert any("streamed job" in warning for warning in result["warnings"])
    assert result["peak_rss_bytes"] < 3 << 30, result
    assert decoded["tokens_in_context"] > 4  # the prompt's tokens and the decoded ones
