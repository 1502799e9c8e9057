"""The numeric core never imports the service, web or queue layers; our names live under ``bitplan.`` only, so
Hugging Face's ``kernels`` package (which transformers imports when present) and ours both import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("fastapi", "starlette", "uvicorn", "redis", "huey", "pydantic_settings")
CORE = ("bitplan.allocator", "bitplan.sensitivity", "bitplan.quantizer", "bitplan.kernels", "bitplan.pipeline",
        "bitplan.cli", "bitplan.spec")


def _run_elsewhere(code: str, cwd: Path, extra_path: Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter outside the repository (so only installed names are importable)."""
    env_path = [] if extra_path is None else [str(extra_path)]
    script = f"import sys\nsys.path[:0] = {env_path!r}\n" + code
    result = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=cwd)
    return result.stdout


def test_core_imports_no_service_layer(tmp_path: Path) -> None:
    code = (
        f"import importlib\nfor name in {CORE!r}: importlib.import_module(name)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m.startswith('bitplan.service')]\n"
        "assert not bad, bad\n"
    )
    _run_elsewhere(code, tmp_path)


def test_issue13_no_generic_top_level_names_installed(tmp_path: Path) -> None:
    code = (
        "import importlib.util\n"
        "print([n for n in ('allocator', 'sensitivity', 'quantizer', 'kernels', 'service') "
        "if importlib.util.find_spec(n) is not None])\n"
    )
    assert _run_elsewhere(code, tmp_path).strip() == "[]"


def test_issue13_hugging_face_kernels_and_ours_both_import(tmp_path: Path) -> None:
    """A stand-in for Hugging Face's ``kernels`` package on the path beside our install: both import, and
    transformers (which imports ``kernels`` when present) still loads a model class."""
    standin = tmp_path / "site"
    (standin / "kernels").mkdir(parents=True)
    (standin / "kernels" / "__init__.py").write_text("HF_KERNELS = True\n")
    code = (
        "import kernels, bitplan.kernels\n"
        "from bitplan.kernels import QuantLinear\n"
        "assert kernels.HF_KERNELS and bitplan.kernels.__name__ == 'bitplan.kernels'\n"
        "import transformers\nfrom transformers import LlamaForCausalLM\n"
        "print(kernels.__file__)\nprint(bitplan.kernels.__file__)\n"
    )
    hf, ours = _run_elsewhere(code, tmp_path, standin).split()
    assert hf.startswith(str(standin)) and ours.endswith("kernels/__init__.py") and hf != ours
