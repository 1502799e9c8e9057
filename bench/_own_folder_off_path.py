"""Imported first by every bench script: ``bench/allocator.py`` is named like the ``allocator`` package, so
when a script here runs as ``python bench/NAME.py`` this folder must leave the front of the import path."""

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
