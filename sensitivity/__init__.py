"""Sensitivity metrics: a predicted loss increase for quantizing each unit at each bit width."""

from bitplan.sensitivity.activations import Cancelled, UnitStatistics, collect_unit_statistics
from bitplan.sensitivity.api import SensitivityResult, UnitSensitivity, compute_sensitivity
from bitplan.sensitivity.hutchinson import TraceEstimate, estimate_hessian_traces
from bitplan.sensitivity.request import HutchinsonConfig, Metric, SensitivityRequest

__all__ = [
    "Cancelled",
    "HutchinsonConfig",
    "Metric",
    "SensitivityRequest",
    "SensitivityResult",
    "TraceEstimate",
    "UnitSensitivity",
    "UnitStatistics",
    "collect_unit_statistics",
    "compute_sensitivity",
    "estimate_hessian_traces",
]
