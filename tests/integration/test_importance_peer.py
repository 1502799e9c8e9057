"""The importance peer of ``bench/peers.py`` (issue 42): the preset's own file with only its block-linear tensors
replaced, so that its token embedding and head stay the preset's (``bench/_importance_peer.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import gguf
import numpy
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_importance_peer", BENCH / "_importance_peer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


importance_peer = _load()


def _write(path: Path, tensors: dict[str, numpy.ndarray], name: str) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_string("general.name", name)
    for tensor_name, values in tensors.items():
        writer.add_tensor(tensor_name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensors(path: Path) -> dict[str, numpy.ndarray]:
    return {t.name: numpy.array(t.data) for t in gguf.GGUFReader(path).tensors}


def test_graft_takes_block_linear_tensors_from_the_donor_and_the_rest_from_the_base(tmp_path: Path) -> None:
    rng = numpy.random.default_rng(0)
    base = {"token_embd.weight": rng.normal(size=(16, 8)).astype(numpy.float32),
            "blk.0.attn_norm.weight": numpy.ones(8, dtype=numpy.float32),
            "blk.0.attn_q.weight": rng.normal(size=(8, 8)).astype(numpy.float32),
            "blk.0.ffn_down.weight": rng.normal(size=(8, 32)).astype(numpy.float32),
            "output.weight": rng.normal(size=(16, 8)).astype(numpy.float32)}
    donor = {name: values + 1 for name, values in base.items()}
    _write(tmp_path / "base.gguf", base, "base")
    _write(tmp_path / "donor.gguf", donor, "donor")
    importance_peer.graft_block_linear(tmp_path / "base.gguf", tmp_path / "donor.gguf", tmp_path / "out.gguf")

    got = _tensors(tmp_path / "out.gguf")
    assert list(got) == list(base)  # the base's tensors, in its order
    for name, values in got.items():
        expected = donor[name] if name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight") else base[name]
        numpy.testing.assert_array_equal(values, expected, err_msg=name)
    assert gguf.GGUFReader(tmp_path / "out.gguf").get_field("general.name").contents() == "base"


def test_graft_refuses_a_donor_tensor_of_another_shape(tmp_path: Path) -> None:
    base = {"blk.0.attn_q.weight": numpy.zeros((8, 8), dtype=numpy.float32)}
    _write(tmp_path / "base.gguf", base, "base")
    _write(tmp_path / "donor.gguf", {"blk.0.attn_q.weight": numpy.zeros((4, 8), dtype=numpy.float32)}, "donor")
    with pytest.raises(ValueError, match=r"donor\.gguf: blk\.0\.attn_q\.weight is F32 \(4, 8\), base\.gguf has F32"):
        importance_peer.graft_block_linear(tmp_path / "base.gguf", tmp_path / "donor.gguf", tmp_path / "out.gguf")
