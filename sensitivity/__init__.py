"""Sensitivity metrics: a predicted loss increase for quantizing each unit at each bit width."""

from bitplan.sensitivity.activations import Cancelled, UnitStatistics, collect_unit_statistics
from bitplan.sensitivity.api import HutchinsonConfig, Metric, SensitivityResult, UnitSensitivity, compute_sensitivity
from bitplan.sensitivity.hutchinson import TraceEstimate, estimate_hessian_traces

__all__ = [
    "Cancelled",
    "HutchinsonConfig",
    "Metric",
    "SensitivityResult",
    "TraceEstimate",
    "UnitSensitivity",
    "UnitStatistics",
    "collect_unit_statistics",
    "compute_sensitivity",
    "estimate_hessian_traces",
]
