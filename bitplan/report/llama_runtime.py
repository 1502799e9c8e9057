"""llama.cpp (llama-cpp-python) as bitplan runs it: without its extra CPU weight buffers.

llama-cpp-python 0.3.36 built from source on an AVX512/AMX CPU (this project's machines) segfaults in
``llama_decode`` on quantized files (SmolLM2's Q4_1, our GGUFs) when llama.cpp repacks weights into its extra CPU
buffers (AMX or repacked layouts, measured 2026-12-07); with ``use_extra_bufts = False`` (the ``--no-repack`` of
llama.cpp's tools) the same files run, with llama.cpp's plain CPU dot products. ``Llama`` takes no argument for
it, so :func:`plain_cpu_buffers` sets it in the model parameters every ``Llama`` starts from.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def plain_cpu_buffers() -> bool:
    """Make every ``llama_cpp.Llama`` created from now on load without extra CPU buffers (idempotent); ``False``
    when llama-cpp-python is not installed."""
    try:
        from llama_cpp import llama_cpp as low
    except ImportError:
        return False
    default = low.llama_model_default_params

    def params() -> Any:
        chosen = default()
        chosen.use_extra_bufts = False
        return chosen

    low.llama_model_default_params = params
    return True
