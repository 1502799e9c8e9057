"""bitplan: decide how many bits each part of a network gets, quantize it, pack it, evaluate it."""

__version__ = "0.1.0"
