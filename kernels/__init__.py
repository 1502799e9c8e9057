"""Low-level tensor kernels: bit packing, group-wise dequantization and the ``QuantLinear`` module.

Every routine here is a pure-torch reference; faster Triton versions must match it.

This folder is installed as ``bitplan.kernels``. When the repository root is on ``sys.path`` (``python -m`` or
``python -c`` from a clone, pytest's rootdir) it is also found under the bare name ``kernels``, which belongs to
Hugging Face's ``kernels`` distribution (a dependency of transformers >= 5.25, imported by ``from transformers import
PreTrainedModel``). Imported under that name, this module hands the name over to that distribution and defines
nothing of its own.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _clone = Path(__file__).resolve().parent.parent
    _elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != _clone]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.origin is None:  # not installed (or only a namespace folder): no module of that name
        raise ModuleNotFoundError("No module named 'kernels' (the clone's kernels/ folder is bitplan.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds once this file has run
    _spec.loader.exec_module(_module)
else:
    from bitplan.kernels.bitpack import pack_bitstream_int32, packed_words, unpack_bitstream_int32
    from bitplan.kernels.dequant import dequantize_groupwise
    from bitplan.kernels.quant_linear import QuantLinear

    __all__ = ["QuantLinear", "dequantize_groupwise", "pack_bitstream_int32", "packed_words",
               "unpack_bitstream_int32"]
