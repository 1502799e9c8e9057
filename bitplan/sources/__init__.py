"""The sources: a model reference resolved and loaded (or opened lazily: a skeleton on the meta device and a store
that reads one tensor when asked), its units and experts, its devices, the calibration text, and the streamed pass
over its blocks."""

from bitplan.sources.lazy import LazyModel, Placement, open_lazy
from bitplan.sources.tensors import LoadedTensors, SafetensorsStore, TensorStore

__all__ = ["LazyModel", "LoadedTensors", "Placement", "SafetensorsStore", "TensorStore", "open_lazy"]
