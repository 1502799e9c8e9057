"""Issue 45: the sensitivity cache's key (bitplan.job.sensitivity_pass.measure) stays byte-identical across the
refactor to one sensitivity request type, so results cached before it are still found.

The expected keys were computed by the code path before the request type existed (``measure`` handing its key to
the cache), from the fixed specs below; a change to them loses every cached result of such a job."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from bitplan.job.sensitivity_pass import measure
from bitplan.sources.models import ModelKind
from bitplan.spec import JobSpec

UNITS = {f"model.layers.{i}.{p}": nn.Linear(4, 4) for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")}
SPECS: dict[str, dict[str, Any]] = {
    "formats": {"bits_per_weight": 5.0, "formats": "gguf-legacy", "precision": "float32"},
    "widths_bf16": {"bits_per_weight": 3.5, "metric": "token_taylor", "precision": "bfloat16",
                    "quantizer": "rtn-salience", "candidate_bits": (2, 3, 4), "group_size": 64},
    "hutchinson": {"bits_per_weight": 4.0, "metric": "hutchinson", "candidate_bits": (2, 4, 8)},
    "output_error": {"bits_per_weight": 4.0, "metric": "output_error", "candidate_bits": (2, 4, 8), "group_size": 32},
    "kl_gptq": {"bits_per_weight": 4.0, "metric": "token_kl", "precision": "float32", "formats": "bitplan-int",
                "quantizer": "gptq"},
}
KEYS = {  # computed by the code before issue 45's request type
    "formats": "bc8ff36696bd0792681b20337b623e6eb04610a8c97e42ae61e9711751dd655a",
    "widths_bf16": "2932b94380472d42dfbb71b8dcea0fb7e28763b17af676454d2a9dc5ba687070",
    "hutchinson": "220b8e71e8e5658d691ea55f95c7bb2432296571e6b0006fd136ef20346cb8a7",
    "output_error": "203ef220fa74278b2a1bd458a1b54776d21f992b19b0288c4372344d843e3a6c",
    "kl_gptq": "f37a14d5b5cd776ff5594ec1462966a186f651c2ea346677f948a9c714a4ab75",
}
LAZY_BFLOAT16_FORMATS_KEY = "1a7632f31269f98cb30dcebb52bb9e7259216511bbb9e050f4d62108b2d96ff7"


class RecordingCache:
    """A cache that records the key it is asked for and answers a hit, so ``measure`` computes nothing."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def lookup(self, key: str) -> tuple[str, str]:
        self.keys.append(key)
        return "cached", "this machine"


def measured_key(case: str, lazy: object = None) -> str:
    spec = JobSpec.from_flat(model="m", **SPECS[case])
    loaded = SimpleNamespace(source_sha256="ab" * 32, kind=ModelKind.CAUSAL_LM, lazy=lazy)
    cache = RecordingCache()
    measure(spec, loaded, UNITS, SimpleNamespace(sha256="cd" * 32), None, None, cache)  # type: ignore[arg-type]
    return cache.keys[0]


@pytest.mark.parametrize("case", sorted(SPECS))
def test_issue45_the_sensitivity_cache_key_is_unchanged(case: str) -> None:
    assert measured_key(case) == KEYS[case]


def test_issue45_a_streamed_bfloat16_job_keeps_its_key() -> None:
    lazy = SimpleNamespace(placement=SimpleNamespace(dtype=torch.bfloat16))
    assert measured_key("formats", lazy) == LAZY_BFLOAT16_FORMATS_KEY
