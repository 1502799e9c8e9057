"""Issue 45: a budget named by a llama.cpp preset (``--size-of Q4_K_M``) is the bytes of the file that preset
makes of the model, computed without writing it, and a name llama.cpp does not know is refused with the list."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitplan.errors import BitplanError, ModelReferenceError, SpecError
from bitplan.job.pipeline import resolve_named_size
from bitplan.job.preset_size import SIZE_PRESETS, preset_file_bytes
from bitplan.sources.models import resolve_reference
from bitplan.spec import JobSpec


def llama_cpp_preset_file(source: Path, out: Path, preset: str) -> int:
    """The size of the file ``llama_model_quantize`` writes at ``preset`` (defaults, requantizing allowed)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out.stat().st_size


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_S"])
def test_issue45_size_of_is_exactly_the_bytes_of_llama_cpps_preset_file(preset: str, tmp_path: Path) -> None:
    _, source = resolve_reference("smollm2-135m")
    written = llama_cpp_preset_file(source, tmp_path / f"{preset}.gguf", preset)
    assert preset_file_bytes(source, preset) == written
    spec = resolve_named_size(JobSpec.from_flat(model="smollm2-135m", size_of=preset, target="gguf"))
    assert (spec.budget.file_bytes, spec.budget.size_of) == (written, None)


def test_issue45_presets_of_different_sizes_differ_in_the_right_order() -> None:
    """Q3_K_S < Q4_K_M < Q8_0 on SmolLM2 (a check that the dry run's types are read, not the source's)."""
    _, source = resolve_reference("smollm2-135m")
    sizes = [preset_file_bytes(source, p) for p in ("Q3_K_S", "Q4_K_M", "Q8_0")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3 and sizes[-1] != source.stat().st_size


def test_issue45_size_of_refusals_say_how_to_fix_them(tiny_llama_dir: Path) -> None:
    with pytest.raises(SpecError, match=r"unknown size_of 'Q9_K'; choose one of Q2_K, .*Q4_K_M") as unknown:
        JobSpec.from_flat(model="smollm2-135m", size_of="Q9_K", target="gguf")
    assert unknown.value.param == "size_of"
    with pytest.raises(SpecError, match=r"--size-of\) is the bytes of a llama.cpp GGUF file: add --target gguf"):
        JobSpec.from_flat(model="smollm2-135m", size_of="Q4_K_M")
    with pytest.raises(SpecError, match="give exactly one of"):
        JobSpec.from_flat(model="smollm2-135m", size_of="Q4_K_M", file_bytes=10**8, target="gguf")
    with pytest.raises(ModelReferenceError, match="from a GGUF file; .* is a hf-folder model: give --file-bytes"):
        resolve_named_size(JobSpec.from_flat(model=str(tiny_llama_dir), size_of="Q4_K_M", target="gguf"))
    with pytest.raises(BitplanError, match="choose one of Q2_K"):
        preset_file_bytes(Path("unused.gguf"), "IQ2_XXS")
    assert JobSpec.from_flat(model="smollm2-135m", size_of="Q4_K_M", target="gguf").budget.describe() == (
        "the size of llama.cpp's Q4_K_M file")


def test_issue45_cli_unknown_preset_exits_3_with_the_list() -> None:
    result = subprocess.run([sys.executable, "-m", "bitplan.cli", "run", "--model", "smollm2-135m", "--size-of",
                             "Q4_K_X", "--target", "gguf", "--out", "unused", "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr[-2000:]
    error = json.loads(result.stdout.strip().splitlines()[-1])
    assert error["error"]["param"] == "size_of" and all(p in json.dumps(error) for p in SIZE_PRESETS)
