"""Model references: every bad input gets a clear error naming what was given and what is accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitplan.errors import ModelReferenceError
from bitplan.sources.models import BUNDLED_MODELS, ModelKind, load_model, resolve_reference


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_files_are_refused_without_opening(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelReferenceError, match="Convert the weights to safetensors"):
        resolve_reference(str(path))


def test_folder_with_only_pickle_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelReferenceError, match="pickle weights .*pytorch_model.bin.*convert them to safetensors"):
        resolve_reference(str(tmp_path))


def test_unknown_id() -> None:
    with pytest.raises(ModelReferenceError, match="'no-such-model' is neither a bundled id.*smollm2-135m, minilm-l6"):
        load_model("no-such-model")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelReferenceError, match="neither a bundled id nor an existing path"):
        load_model(str(tmp_path / "absent.safetensors"))


def test_safetensors_without_config(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ModelReferenceError, match="without a config.json beside it"):
        resolve_reference(str(path))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelReferenceError, match="has no config.json"):
        resolve_reference(str(tmp_path))


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelReferenceError, match="unsupported architecture 'vit'.*causal language models"):
        load_model(str(tmp_path))


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelReferenceError, match="unsupported model file"):
        resolve_reference(str(path))


def test_malformed_safetensors(tmp_path: Path, tiny_llama_dir: Path) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelReferenceError, match="header claims"):
        load_model(str(tmp_path))
    header = b'{"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}'
    weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 16)
    with pytest.raises(ModelReferenceError, match="tensor 'w' has byte range"):
        load_model(str(tmp_path))
    weights.write_bytes((5).to_bytes(8, "little") + b"{oops")
    with pytest.raises(ModelReferenceError, match="corrupt safetensors header"):
        load_model(str(tmp_path))


def test_hf_folder_and_single_file_load_the_same_weights(tiny_llama_dir: Path) -> None:
    folder = load_model(str(tiny_llama_dir))
    single = load_model(str(tiny_llama_dir / "model.safetensors"))
    assert folder.kind is ModelKind.CAUSAL_LM and folder.source_format == "hf-folder"
    assert single.source_format == "safetensors"
    a, b = folder.model.state_dict(), single.model.state_dict()
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_bundled_models_are_listed() -> None:
    assert {"smollm2-135m", "minilm-l6"} <= set(BUNDLED_MODELS)


@pytest.mark.parametrize("content", [b"GGUFxxxxgarbage", b"not a gguf file at all" * 10, b""])
def test_malformed_gguf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelReferenceError, match="not a valid GGUF file"):
        load_model(str(path))


def test_truncated_gguf(tmp_path: Path) -> None:
    source = BUNDLED_MODELS["smollm2-135m"].path()
    path = tmp_path / "truncated.gguf"
    with source.open("rb") as handle:
        path.write_bytes(handle.read(4 << 20))
    with pytest.raises(ModelReferenceError, match="not a valid GGUF file|past the file's"):
        load_model(str(path))


def test_an_already_quantized_folder_is_refused_as_a_source(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A bitplan artifact folder loads in transformers now (its quantization_config): as a job's model it is
    refused, naming what to give instead, not quantized a second time."""
    from bitplan.job.pipeline import run_pipeline
    from bitplan.spec import JobSpec

    run = run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), uniform_bits=4, num_samples=2, seq_len=32,
                                         group_size=64), out=tmp_path / "artifact")
    with pytest.raises(ModelReferenceError, match="already quantized \\(bitplan\\)") as refused:
        load_model(run.artifact)
    assert refused.value.param == "model" and "load_artifact" in str(refused.value)
