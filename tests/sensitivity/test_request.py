"""Issue 45: the one sensitivity request type checks itself on construction, with messages that say how to fix."""

from __future__ import annotations

import pytest
import torch

from bitplan.sensitivity.request import DEFAULT_ERROR_BYTES, Metric, SensitivityRequest


def test_issue45_a_request_takes_a_metric_by_name_and_widths_as_a_tuple() -> None:
    request = SensitivityRequest("token_taylor_kl", bits_options=[4, 2])  # type: ignore[arg-type]
    assert request.metric is Metric.TOKEN_TAYLOR_KL and request.bits_options == (4, 2)
    assert (request.group_size, request.max_error_bytes, request.precision) == (128, DEFAULT_ERROR_BYTES, "auto")
    assert request.curvature_stride is None  # the metric's own


@pytest.mark.parametrize(("settings", "message"), [
    ({"precision": "float16"}, "precision must be 'auto', 'float32' or 'bfloat16', got 'float16'"),
    ({"curvature_stride": 0}, "curvature_stride must be at least 1, got 0"),
    ({"options": {"lm_head": ["Q4_0"]}}, "options and error_of go together"),
    ({"error_of": lambda name, key: torch.zeros(1)}, "options and error_of go together"),
])
def test_issue45_a_request_refuses_settings_it_cannot_run(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SensitivityRequest(Metric.TOKEN_FISHER, **settings)  # type: ignore[arg-type]


def test_issue45_an_unknown_metric_name_is_refused() -> None:
    with pytest.raises(ValueError, match="'tokens' is not a valid Metric"):
        SensitivityRequest("tokens")  # type: ignore[arg-type]
