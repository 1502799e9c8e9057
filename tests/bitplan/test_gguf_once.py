"""A GGUF reference's header is parsed once per load (``bitplan.sources.gguf_once``), and the load is the same."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from bitplan.sources.gguf_once import gguf_parsed_once
from bitplan.sources.models import BUNDLED_MODELS, load_model


def _small_gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("test.value", 7)
    writer.add_tensor("weight", np.arange(32, dtype=np.float32).reshape(2, 16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_one_reader_per_file_within_the_block_and_the_class_restored(tmp_path: Path) -> None:
    first, second = _small_gguf(tmp_path / "a.gguf"), _small_gguf(tmp_path / "b.gguf")
    original = gguf.GGUFReader
    with gguf_parsed_once() as readers:
        a = gguf.GGUFReader(first)
        assert gguf.GGUFReader(str(first)) is a and gguf.GGUFReader(tmp_path / "." / "a.gguf") is a
        assert gguf.GGUFReader(second) is not a
        assert np.array_equal(np.asarray(a.tensors[0].data).reshape(-1), np.arange(32, dtype=np.float32))
        assert len(readers) == 2
    assert gguf.GGUFReader is original
    with pytest.raises(RuntimeError), gguf_parsed_once():
        raise RuntimeError("the load failed")
    assert gguf.GGUFReader is original


@pytest.mark.slow
def test_smollm2_loads_the_same_with_one_header_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled SmolLM2 GGUF: the same weights and tokenizer as when every opening parses the header again
    (the reference), and one parse instead of several."""
    original = gguf.GGUFReader
    parses: list[str] = []

    class Counted(original):  # type: ignore[misc,valid-type]
        def __init__(self, path: str | Path, mode: str = "r") -> None:
            parses.append(str(path))
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    once = load_model("smollm2-135m")
    assert len(parses) == 1, parses
    import bitplan.sources.gguf_once as module

    monkeypatch.setattr(module, "gguf_parsed_once", _no_sharing)
    again = load_model("smollm2-135m")
    assert len(parses) > 2  # the reference: each opening parses
    ours, reference = once.model.state_dict(), again.model.state_dict()
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    text = "The capital of France is"
    assert once.tokenizer(text)["input_ids"] == again.tokenizer(text)["input_ids"]
    assert BUNDLED_MODELS["smollm2-135m"].path().is_file()


class _no_sharing:  # noqa: N801 - stands in for the context manager function
    def __enter__(self) -> dict[tuple[str, str], object]:
        return {}

    def __exit__(self, *_: object) -> None:
        return None
