"""Issue 41's compute dtype in the sensitivity cache's key (bitplan.job.sensitivity_pass): a streamed job computing in
bfloat16 never reuses a float32 result, nor leaves one a float32 job would reuse; float32 keys are the keys of
results cached before the option existed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from bitplan.job.sensitivity_pass import compute_dtype_key
from bitplan.job.streamed_job import run_streamed_gguf
from bitplan.sensitivity.cache import SensitivityCache
from bitplan.sources.lazy import Placement
from bitplan.sources.models import LoadedModel, ModelKind
from bitplan.spec import JobSpec
from tests.exports.test_gguf_hf_source import hf_folder, smollm2_tokenizer  # noqa: F401, F811 (a fixture)


def test_issue41_a_bfloat16_streamed_job_does_not_reuse_a_float32_sensitivity(
        smollm2_tokenizer: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = hf_folder(tmp_path, smollm2_tokenizer, "llama")
    cache = SensitivityCache(tmp_path / "cache")
    states = []
    for index, dtype in enumerate(["float32", "bfloat16", "bfloat16", "auto"]):
        spec = JobSpec.from_flat(model=str(folder), bits_per_weight=5.0, target="gguf", num_samples=2, seq_len=32,
                                 quality_windows=0, compute_dtype=dtype)
        (result,) = run_streamed_gguf(spec, out_dirs=[tmp_path / f"out{index}"], cache=cache)
        states.append(result.calibration["sensitivity_cache"])
    assert states == ["miss", "miss", "hit", "hit"]  # auto is float32: the first job's entry
    assert len(list(cache.folder.glob("*.json"))) == 2


def test_issue41_the_float32_key_part_is_empty_so_older_cache_entries_stay_valid() -> None:
    def loaded(lazy: object) -> LoadedModel:
        return LoadedModel(model=torch.nn.Linear(4, 4), tokenizer=None, kind=ModelKind.CAUSAL_LM, reference="m",
                           source_format="hf-folder", source_path=Path("m"), source_sha256="0" * 64, lazy=lazy)

    assert compute_dtype_key(loaded(None)) == {}  # a model in memory computes in float32
    assert compute_dtype_key(loaded(SimpleNamespace(placement=Placement(dtype=torch.float32)))) == {}
    assert compute_dtype_key(loaded(SimpleNamespace(placement=Placement(dtype=torch.bfloat16)))) == {
        "compute_dtype": "bfloat16"}
