"""The numeric core never imports the service, web or queue layers; transformers still imports beside us."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("service", "fastapi", "starlette", "uvicorn", "redis", "huey", "pydantic_settings")


def test_core_imports_no_service_layer() -> None:
    code = (
        "import sys, allocator, sensitivity, quantizer, kernels, bitplan.pipeline, bitplan.cli\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_transformers_imports_with_our_kernels_package() -> None:
    code = "import kernels, transformers\nfrom transformers import LlamaForCausalLM\nprint(kernels.__file__)"
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "kernels/__init__.py" in result.stdout
