"""Formats in the sensitivity pass (issue 16, part 2): the token metric's terms for each format's real error, the
input energy and projected errors behind them, the cache keyed by the formats, and the labels each token metric
reads or draws."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bitplan.job.pipeline import run_budgets
from bitplan.quantizer.formats import FORMATS, PRESETS
from bitplan.sensitivity.importance import input_energy
from bitplan.sensitivity.request import Metric, SensitivityRequest
from bitplan.sensitivity.token_fisher import token_fisher
from bitplan.sources.models import causal_lm_loss, causal_lm_sampled_loss
from bitplan.sources.units import find_units
from bitplan.spec import JobSpec
from tests.bitplan.test_formats_pipeline import SMALL, wide_llama_dir  # noqa: F401, F811 (a fixture)
from tests.sensitivity.test_output_error import captured_io


def test_issue16_format_errors_reach_the_token_metric_exactly() -> None:
    """The per-token terms of any weight error, against a direct computation (the slow reference)."""
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    units = find_units(model)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(5))
    options = {name: ["Q4_0", "int3-g32", "Q8_0"] for name in units}

    def error_of(name: str, fmt: str) -> torch.Tensor:
        weight = units[name].weight.detach()
        return FORMATS[fmt].roundtrip(weight) - weight

    request = SensitivityRequest(Metric.TOKEN_FISHER, group_size=32, options=options, error_of=error_of,
                                 precision="float32")
    terms = token_fisher(model, units, [tokens[:1], tokens[1:]], request, loss_fn=causal_lm_loss)
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
        xs, grads = zip(*(captured_io(model, name, tokens[i : i + 1]) for i in range(2)), strict=True)
        x, g = torch.cat(xs), torch.cat(grads)
        for fmt in options[name]:
            per_token = ((x @ error_of(name, fmt).T) * g).sum(dim=1)
            assert terms.second_order[name][fmt] == pytest.approx(0.5 * float((per_token**2).sum()) / 40, rel=1e-4)
            assert terms.first_order[name][fmt] == pytest.approx(float(per_token.sum()) / 40, rel=1e-4, abs=1e-9)
        assert terms.second_order[name]["Q8_0"] < terms.second_order[name]["Q4_0"]


def test_issue16_input_energy_is_the_gram_diagonal() -> None:
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    units = find_units(model)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    energy = input_energy(model, units, [tokens[:1], tokens[1:]])
    name = "model.layers.1.mlp.down_proj"
    xs = torch.cat([captured_io(model, name, tokens[i : i + 1])[0] for i in range(2)])
    assert torch.allclose(energy[name], torch.diag(xs.T @ xs), rtol=1e-4)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_issue16_projected_errors_both_ways_equal_the_direct_sum(shape: tuple[int, int]) -> None:
    from bitplan.sensitivity.token_terms import projected_errors

    gen = torch.Generator().manual_seed(3)
    out_features, in_features = shape
    g, x = torch.randn(7, out_features, generator=gen), torch.randn(7, in_features, generator=gen)
    deltas = torch.randn(3, out_features, in_features, generator=gen)
    direct = torch.stack([torch.stack([g[t] @ deltas[b] @ x[t] for t in range(7)]) for b in range(3)])
    assert torch.allclose(projected_errors(g, deltas, x), direct, atol=1e-5)
    fast = projected_errors(g, deltas.bfloat16(), x)  # bfloat16 deltas: the products in bfloat16, float32 out
    assert fast.dtype == torch.float32
    assert torch.allclose(fast, direct, rtol=2e-2, atol=2e-2 * float(direct.abs().max()))


def test_issue16_sensitivity_cache_keys_include_the_formats(wide_llama_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    base = {"model": str(wide_llama_dir), **SMALL}
    first = run_budgets(JobSpec.from_flat(bits_per_weight=5.0, formats="gguf-legacy", **base),
                        out_dirs=[tmp_path / "a"])[0]
    again = run_budgets(JobSpec.from_flat(bits_per_weight=4.8, formats="gguf-legacy", **base),
                        out_dirs=[tmp_path / "b"])[0]
    other = run_budgets(JobSpec.from_flat(bits_per_weight=5.0, formats="Q4_0,Q8_0", **base),
                        out_dirs=[tmp_path / "c"])[0]
    assert first.calibration["sensitivity_cache"] == "miss"
    assert again.calibration["sensitivity_cache"] == "hit"
    assert other.calibration["sensitivity_cache"] == "miss"
    assert {u["format"] for u in other.units} <= {"Q4_0", "Q8_0"}


def test_issue16_a_token_kl_job_draws_its_labels_from_the_model(wide_llama_dir: Path, tmp_path: Path,  # noqa: F811
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import bitplan.job.sensitivity_pass as sensitivity_pass

    drawn = []

    def counted(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        drawn.append(tokens.shape)
        return causal_lm_sampled_loss(model, tokens)

    monkeypatch.setattr(sensitivity_pass, "causal_lm_sampled_loss", counted)
    base = {"model": str(wide_llama_dir), "formats": "bitplan-mix", **SMALL}
    kl = run_budgets(JobSpec.from_flat(bits_per_weight=4.0, metric="token_kl", **base), out_dirs=[tmp_path / "a"])[0]
    assert drawn and kl.metric == "token_kl" and kl.calibration["sensitivity_cache"] == "miss"
    assert abs(kl.bits_per_weight - 4.0) < 0.05 and {u["format"] for u in kl.units} <= set(PRESETS["bitplan-mix"])
    again = run_budgets(JobSpec.from_flat(bits_per_weight=4.0, metric="token_kl", **base), out_dirs=[tmp_path / "b"])[0]
    assert again.calibration["sensitivity_cache"] == "hit"
    assert [u["format"] for u in again.units] == [u["format"] for u in kl.units]
    calls = len(drawn)
    taylor = run_budgets(JobSpec.from_flat(bits_per_weight=4.0, metric="token_taylor", **base),
                         out_dirs=[tmp_path / "c"])[0]
    assert taylor.metric == "token_taylor" and taylor.calibration["sensitivity_cache"] == "miss"
    assert len(drawn) == calls  # token_taylor reads the text's labels only


def test_issue16_a_token_taylor_kl_job_reads_the_texts_labels_and_draws_the_models(
        wide_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The slope from the text's labels on every calibration window, the curvature from labels drawn from the model
    on every other one (each chunk of errors: one here)."""
    import bitplan.job.sensitivity_pass as sensitivity_pass

    calls: dict[str, int] = {"text": 0, "model": 0}

    def counting(kind: str, loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def counted(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
            calls[kind] += 1
            return loss(model, tokens)

        return counted

    monkeypatch.setattr(sensitivity_pass, "causal_lm_loss", counting("text", causal_lm_loss))
    monkeypatch.setattr(sensitivity_pass, "causal_lm_sampled_loss", counting("model", causal_lm_sampled_loss))
    spec = JobSpec.from_flat(model=str(wide_llama_dir), formats="bitplan-mix", bits_per_weight=4.0,
                             metric="token_taylor_kl", **{**SMALL, "num_samples": 3})
    run = run_budgets(spec, out_dirs=[tmp_path / "a"])[0]
    windows = spec.calibration.num_samples
    assert run.metric == "token_taylor_kl" and run.calibration["sensitivity_cache"] == "miss"
    assert calls == {"text": windows, "model": (windows + 1) // 2}
    assert abs(run.bits_per_weight - 4.0) < 0.05 and {u["format"] for u in run.units} <= set(PRESETS["bitplan-mix"])
    again = run_budgets(spec, out_dirs=[tmp_path / "b"])[0]  # its own cache entry, stride in the key
    assert again.calibration["sensitivity_cache"] == "hit" and calls == {"text": windows, "model": (windows + 1) // 2}
    assert [u["format"] for u in again.units] == [u["format"] for u in run.units]


def test_issue16_a_format_predicted_better_than_float_is_not_preferred_to_an_exact_one() -> None:
    """The token metric's first-order term can predict a negative loss increase; with formats it counts as 0,
    so an exact format (both terms 0) is kept over a coarser one that merely looks helpful on the calibration
    text, while a real second-order cost stays."""
    from bitplan.sensitivity.api import taylor_increase

    first = {"Q4_0": -0.5, "Q4_1": 0.0, "Q8_0": 0.01}
    second = {"Q4_0": 0.2, "Q4_1": 0.0, "Q8_0": 0.001}
    predicted = taylor_increase(first, second, None, monotone=False)
    assert predicted == pytest.approx({"Q4_0": 0.2, "Q4_1": 0.0, "Q8_0": 0.011})
    assert min(predicted, key=predicted.__getitem__) == "Q4_1"
    assert taylor_increase({4: -0.5, 8: -0.1}, {4: 0.2, 8: 0.0}) == {4: -0.1, 8: -0.1}  # widths: as before
    # the prediction itself (what bench/format_spearman.py scores beside the rule): each option's own sum
    assert taylor_increase(first, second, None, monotone=False, signed=True) == pytest.approx(
        {"Q4_0": -0.3, "Q4_1": 0.0, "Q8_0": 0.011})
