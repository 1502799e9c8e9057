"""The streamed gguf job (bitplan.job.streamed_job) on a tiny Hugging Face folder: the GGUF it writes tensor by tensor
holds the weights its streamed quality report measured (that report equals the whole-model one with the GGUF's
weights swapped in), and llama.cpp loads and decodes it."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from bitplan.errors import ModelReferenceError
from bitplan.job.streamed_job import GGUF_FILE, run_streamed_gguf, streams
from bitplan.report.quality import heldout_windows, measure_quality
from bitplan.sources.models import load_model
from bitplan.sources.units import find_units
from bitplan.spec import JobSpec
from tests.exports.test_gguf_hf_source import hf_folder, smollm2_tokenizer  # noqa: F401, F811 (a fixture)


def unpermute_rows_for_llama(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = tensor.shape[0]
    return tensor.reshape(n_head, rows // n_head // 2, 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_gguf_job_writes_what_its_quality_measured(arch: str, smollm2_tokenizer: Path,  # noqa: F811
                                                             tmp_path: Path) -> None:
    folder = hf_folder(tmp_path, smollm2_tokenizer, arch)
    spec = JobSpec.from_flat(model=str(folder), bits_per_weight=5.0, target="gguf", num_samples=2, seq_len=32,
                             quality_windows=2, quality_seq_len=32)
    assert not streams(spec)  # under 2 GiB in float32: `bitplan run` keeps the whole-model path for it
    (result,) = run_streamed_gguf(spec, out_dirs=[tmp_path / "out"])
    assert result.status == "optimal" and result.bits_per_weight <= 5.0
    path = tmp_path / "out" / GGUF_FILE
    assert {f["name"] for f in result.files} == {GGUF_FILE, "model.imatrix.gguf"}
    assert result.file_bytes == path.stat().st_size

    loaded = load_model(str(folder))
    units = find_units(loaded.model)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    heads = {"attn_q": 4, "attn_k": 2}
    replacements = {}
    for index, name in enumerate(units):
        layer, kind = name.split(".")[2], name.split(".")[-1]
        gguf_name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        tensor = tensors[f"blk.{layer}.{gguf_name}.weight"]
        assert tensor.tensor_type.name == result.units[index]["format"]
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).float()
        if arch == "llama" and gguf_name in heads:
            values = unpermute_rows_for_llama(values, heads[gguf_name])
        replacements[name] = values
    unit_bytes = sum(int(tensors[name].n_bytes) for name in tensors if name.startswith("blk.")
                     and not name.endswith("norm.weight") and not name.endswith(".bias"))
    assert unit_bytes == result.bytes <= result.budget["bytes"]  # the file's block weights, within the budget
    assert result.bytes == result.predicted_bytes
    windows, text = heldout_windows(loaded.tokenizer, windows=2, seq_len=32)
    whole = measure_quality(loaded.model, units, replacements, windows, text=text)
    assert result.quality is not None
    assert result.quality["kl_mean"] == pytest.approx(whole.kl_mean, rel=1e-4, abs=1e-7)
    assert result.quality["top1_agreement"] == whole.top1_agreement
    assert result.quality["ppl_source"] == pytest.approx(whole.ppl_source, rel=1e-5)

    import llama_cpp

    runtime = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    prompt = runtime.tokenize(b"the function returns the value", add_bos=False)
    completion = runtime.create_completion("the function returns the value", max_tokens=4, temperature=0)
    assert completion["usage"]["completion_tokens"] == 4 and len(prompt) > 2
    runtime.close()


def test_streamed_gguf_job_refuses_what_it_cannot_stream() -> None:
    with pytest.raises(ModelReferenceError, match="reads a Hugging Face folder"):
        run_streamed_gguf(JobSpec.from_flat(model="smollm2-135m", bits_per_weight=5.0, target="gguf"),
                          out_dirs=[Path("unused")])
