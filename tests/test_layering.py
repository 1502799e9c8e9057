"""The numeric core never imports the service, web or queue layers; our names live under ``bitplan.`` only, so
Hugging Face's ``kernels`` package (which transformers imports when present) and ours both import."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("fastapi", "starlette", "uvicorn", "redis", "huey", "pydantic_settings")
CORE = ("bitplan.allocator", "bitplan.sensitivity", "bitplan.quantizer", "bitplan.kernels", "bitplan.pipeline",
        "bitplan.cli", "bitplan.spec")
ROOT = Path(__file__).resolve().parent.parent


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
    """Outside the clone, none of the repository's folders is importable under a bare name (``kernels`` may be: it
    is Hugging Face's distribution, which transformers >= 5.25 installs, never our folder)."""
    code = (
        "import importlib.util\n"
        "specs = [(n, importlib.util.find_spec(n)) for n in ('allocator', 'sensitivity', 'quantizer', 'kernels', "
        "'service')]\n"
        f"print([n for n, spec in specs if spec is not None\n"
        f"       and (spec.origin or '').startswith({str(ROOT)!r} + '/' + n)])\n"
    )
    assert _run_elsewhere(code, tmp_path).strip() == "[]"


def _hugging_face_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("where", ["outside", "clone_root"])
def test_issue13_hugging_face_kernels_and_ours_both_import(tmp_path: Path, where: str) -> None:
    """Hugging Face's ``kernels`` (the real one when installed, else a stand-in on the path) and ours both import, and
    transformers (which imports ``kernels`` when that distribution is installed) still loads a model class. From the
    clone's root (``python -m``/``-c`` there, and pytest, put it first on ``sys.path``) the folder ``kernels/`` is
    found first under the bare name and hands it over to the installed distribution."""
    extra = None
    if not _hugging_face_kernels_installed():
        extra = tmp_path / "site"
        (extra / "kernels").mkdir(parents=True)
        (extra / "kernels" / "__init__.py").write_text("HF_KERNELS = True\n")
    code = (
        "import kernels, bitplan.kernels\n"
        "from bitplan.kernels import QuantLinear\n"
        "assert bitplan.kernels.__name__ == 'bitplan.kernels' and not hasattr(kernels, 'QuantLinear')\n"
        "from transformers import PreTrainedModel, LlamaForCausalLM\n"
        "print(kernels.__file__)\nprint(bitplan.kernels.__file__)\n"
    )
    hf, ours = _run_elsewhere(code, tmp_path if where == "outside" else ROOT, extra).split()
    assert not hf.startswith(str(ROOT / "kernels")) and ours == str(ROOT / "kernels" / "__init__.py")


def test_issue13_bare_kernels_from_the_clone_without_the_distribution_is_missing() -> None:
    """With no ``kernels`` distribution importable, the bare name from the clone's root is a plain
    ModuleNotFoundError (what transformers' optional import expects), not our folder."""
    code = (
        "sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as error:\n    print('missing', error.name)\n"
        "else:\n    print('found', kernels.__file__)\n"
    )
    assert _run_elsewhere(code, ROOT).strip() == "missing kernels"
