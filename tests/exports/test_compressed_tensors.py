"""compressed-tensors export of tiny-model artifacts, decompressed by the compressed-tensors library itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitplan.errors import BitplanError
from bitplan.job.pipeline import run_pipeline
from bitplan.spec import JobSpec
from bitplan.targets.artifact import load_artifact
from bitplan.targets.exports import export_artifact

pytest.importorskip("compressed_tensors", reason="compressed-tensors is installed by pip install '.[test]'")


def decompressed_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every quantized module's weight as the compressed-tensors library decompresses it."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    state = load_file(str(folder / "model.safetensors"))
    weights = {}
    for key in state:
        if not key.endswith(".weight_packed"):
            continue
        name = key.removesuffix(".weight_packed")
        scheme = next(s for s in config.config_groups.values() if any(re.match(t[3:], name) for t in s.targets))
        local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        weights[name] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    return weights


@pytest.mark.parametrize(("group_size", "mix_groups"), [(64, False), (32, True)])
def test_library_decompresses_our_weights_exactly(tiny_llama_dir: Path, tmp_path: Path, group_size: int,
                                                   mix_groups: bool) -> None:
    spec = JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=3.5, candidate_bits=(2, 3, 4, 5, 8),
                             num_samples=2, seq_len=32, group_size=group_size, mix_groups=mix_groups)
    run = run_pipeline(spec, out=tmp_path / "a")
    report = export_artifact(Path(run.artifact), format="compressed-tensors", out=tmp_path / "ct")
    assert report.bytes == report.predicted_bytes > 0
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    assert {g["weights"]["num_bits"] for g in config["config_groups"].values()} == {u["bits"] for u in report.units}
    for row in report.units:  # issue 17: what vLLM would serve each layer with, per GPU generation
        assert set(row["vllm_kernel"]) == {"sm90", "sm80", "sm75"}
        if row["bits"] not in (4, 8):
            assert all(isinstance(k, dict) and "none" in k for k in row["vllm_kernel"].values())
    model, _, _ = load_artifact(Path(run.artifact))
    weights = decompressed_weights(tmp_path / "ct")
    assert set(weights) == {u["name"] for u in run.units}
    for name, weight in weights.items():  # the library dequantizes in fp16: ours rounded to fp16 once
        assert torch.equal(weight, model.get_submodule(name).dequantized_weight().half()), name
    assert (tmp_path / "ct" / "tokenizer.json").is_file()


def test_export_refuses_a_non_empty_folder_and_unknown_formats(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run = run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), uniform_bits=4, num_samples=2, seq_len=32,
                                         group_size=64), out=tmp_path / "a")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(BitplanError, match="new or empty folder"):
        export_artifact(Path(run.artifact), format="compressed-tensors", out=tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    with pytest.raises(BitplanError, match="unknown export format"):
        export_artifact(Path(run.artifact), format="onnx", out=tmp_path / "o")
    with pytest.raises(BitplanError, match="needs a BPE tokenizer in tokenizer.json"):  # an HF folder: its tokenizer
        export_artifact(Path(run.artifact), format="gguf", out=tmp_path / "m.gguf")


def test_issue17_vllm_kernel_table_follows_its_rules() -> None:
    from bitplan.targets.exports.vllm_kernels import serving_kernels

    assert serving_kernels(4, 128, 4096, 4096) == {"sm90": "MacheteLinearKernel", "sm80": "MarlinLinearKernel",
                                                   "sm75": "ExllamaLinearKernel"}
    assert serving_kernels(4, 32, 4096, 4096)["sm90"] == "MarlinLinearKernel"  # Machete: groups -1 and 128 only
    small = serving_kernels(8, 64, 576, 576)  # SmolLM2's attention: 576 is no multiple of 128
    assert small["sm90"] == small["sm80"] == "ExllamaLinearKernel"
    two_bit = serving_kernels(2, 128, 4096, 4096)["sm90"]
    assert set(two_bit["none"]) == {"MacheteLinearKernel", "MarlinLinearKernel", "ExllamaLinearKernel"}
    assert all("4/8-bit" in reason for reason in two_bit["none"].values())

