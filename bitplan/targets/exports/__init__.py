"""Exports of a bitplan artifact to the formats other runtimes load (GGUF, compressed-tensors).

Each format is one module that registers its writer (``@register_export(NAME)``) and one import line here."""

from bitplan.targets.exports import compressed_tensors_folder, gguf_file  # noqa: F401 - they register their writers
from bitplan.targets.exports.common import EXPORTERS, ExportReport, export_artifact

__all__ = ["EXPORTERS", "ExportReport", "export_artifact"]
