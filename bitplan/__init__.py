"""bitplan: decide how many bits each part of a network gets, quantize it, pack it, evaluate it."""

__version__ = "0.1.0"

from bitplan.targets.hf_quantizer import install_hook as _install_hook  # noqa: E402 (after the version, for the CLI)

_install_hook()  # transformers' from_pretrained loads our packed folders once transformers is imported
