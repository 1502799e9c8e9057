"""Exports of a mixed SmolLM2-135M artifact (slow: about 5 minutes on 2 cores; run with ``pytest -m slow``).

GGUF: transformers loads the file (its own GGUF reader and dequantizer) and its WikiText-2 perplexity on the
first 16 windows of 512 tokens is within 2% of our artifact's. compressed-tensors: the library decompresses
every layer to our weights exactly (after its fp16 rounding).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitplan.artifact import load_artifact
from bitplan.calibration import read_text
from bitplan.evaluation import perplexity, tokenize_for_perplexity
from bitplan.exports import export_artifact
from bitplan.pipeline import run_pipeline
from bitplan.spec import JobSpec
from tests.exports.test_compressed_tensors import decompressed_weights

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_issue5_exports_of_a_mixed_smollm2_artifact(wikitext: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = run_pipeline(JobSpec.from_flat(model="smollm2-135m", bits_per_weight=3.75, candidate_bits=(2, 3, 4, 5, 8),
                                         num_samples=8, kl_windows=0), out=tmp_path / "mixed")
    assert len({u["bits"] for u in run.units}) > 1
    text = read_text(wikitext)
    model, tokenizer, _ = load_artifact(Path(run.artifact))
    ours = perplexity(model, tokenize_for_perplexity(tokenizer, text), seq_len=512, max_windows=16).ppl

    report = export_artifact(Path(run.artifact), format="gguf", out=tmp_path / "gguf" / "model.gguf")
    assert report.bytes == report.predicted_bytes
    assert {row["type"] for row in report.units} <= {"Q4_1", "Q5_1", "Q8_0"}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf")
    theirs = perplexity(exported.eval(), tokenize_for_perplexity(exported_tokenizer, text), seq_len=512,
                        max_windows=16).ppl
    assert abs(theirs / ours - 1) < 0.02, (ours, theirs)
    import os

    from llama_cpp import Llama  # the runtime GGUF users run: it loads our file and predicts from it

    gguf_path = tmp_path / "gguf" / "model.gguf"
    assert os.path.getsize(gguf_path) == report.file_bytes
    runtime = Llama(model_path=str(gguf_path), n_ctx=64, logits_all=True, verbose=False)
    prompt = runtime.tokenize(b"The capital of France is")
    runtime.eval(prompt)
    logits = torch.tensor(runtime.scores[len(prompt) - 1])
    with torch.no_grad():
        reference = exported(torch.tensor([prompt])).logits[0, -1]
    assert torch.isfinite(logits).all() and int(logits.argmax()) == int(reference.argmax())

    report = export_artifact(Path(run.artifact), format="compressed-tensors", out=tmp_path / "ct")
    assert report.bytes == report.predicted_bytes
    for name, weight in decompressed_weights(tmp_path / "ct").items():
        assert torch.equal(weight, model.get_submodule(name).dequantized_weight().half()), name
