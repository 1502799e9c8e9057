"""Imported first by every bench script: ``bench/allocator.py`` is named like the ``allocator`` package, so
when a script here runs as ``python bench/NAME.py`` this folder must leave the front of the import path."""

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)


def sibling(name: str):  # noqa: ANN201 (a module)
    """Another bench script (``peers`` -> ``bench/peers.py``), loaded from its file: this folder is off the path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(os.path.dirname(__file__),
                                                                               f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
