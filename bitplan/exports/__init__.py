"""Exports of a bitplan artifact to the formats other runtimes load (GGUF, compressed-tensors)."""

from bitplan.exports.common import ExportReport, export_artifact

__all__ = ["ExportReport", "export_artifact"]
