"""KL-guided re-solve: block contributions against direct KL computations, the scaling, the keep rule, the job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.job.pipeline import run_pipeline
from bitplan.job.refine import MAX_SCALE, block_groups, group_scales, refine_allocation, rescaled
from bitplan.quantizer.rtn import dequantize_weight, quantize_rtn
from bitplan.sensitivity import Metric, SensitivityResult, UnitSensitivity
from bitplan.sensitivity.kl import kl_contributions, output_kl
from bitplan.sources.units import find_units
from bitplan.spec import JobSpec
from bitplan.targets.artifact import MANIFEST, load_artifact
from tests.conftest import make_tiny_llama


def quantized_at(units: dict[str, torch.nn.Linear], bits: int) -> dict[str, object]:
    return {name: quantize_rtn(module.weight.detach(), bits=bits, group_size=32) for name, module in units.items()}


def test_block_contributions_against_direct_kl_and_weights_restored() -> None:
    model = make_tiny_llama()
    units = find_units(model)
    originals = {name: m.weight.detach().clone() for name, m in units.items()}
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    replacements = {name: dequantize_weight(q) for name, q in quantized_at(units, 2).items()}
    groups = block_groups(list(units), "model.layers")
    assert list(groups) == ["model.layers.0", "model.layers.1"] and sum(map(len, groups.values())) == len(units)
    batches = list(torch.split(tokens, 1))
    total, contributions = kl_contributions(model, units, replacements, groups, batches)
    assert all(torch.equal(units[name].weight, weight) for name, weight in originals.items())
    assert total == pytest.approx(output_kl(model, units, replacements, batches), rel=1e-6)
    for group, names in groups.items():
        without = {name: w for name, w in replacements.items() if name not in names}
        assert contributions[group] == pytest.approx(total - output_kl(model, units, without, batches),
                                                     rel=1e-5, abs=1e-9)
    assert all(value > 0 for value in contributions.values())


def sensitivity_of(table: dict[str, dict[int, float]]) -> SensitivityResult:
    return SensitivityResult(metric=Metric.TOKEN_TAYLOR, seconds=0.0,
                             units=tuple(UnitSensitivity(name=n, numel=1, score=0.0, delta_loss=d)
                                         for n, d in table.items()))


def test_scales_are_measured_over_predicted_shares_of_the_increase_over_the_widest_width() -> None:
    table = {"a": {2: 3.0, 8: 1.0}, "b": {2: 2.0, 8: -1.0}, "c": {2: 5.0, 8: 1.0}, "d": {2: 0.0, 8: 0.0}}
    sensitivity = sensitivity_of(table)
    groups = {"A": ["a", "b"], "C": ["c"], "D": ["d"]}
    chosen = {"a": 2, "b": 2, "c": 2, "d": 2}
    # predicted increases over 8 bits: A = 2 + 3 = 5, C = 4, D = 0; measured KL: A 1, C 2 (shares 1/3, 2/3)
    scales = group_scales(sensitivity, chosen, groups, {"A": 1.0, "C": 2.0, "D": 0.0})
    assert scales == pytest.approx({"A": (1 / 3) / (5 / 9), "C": (2 / 3) / (4 / 9), "D": 1.0})
    assert group_scales(sensitivity, chosen, groups, {"A": 0.01, "C": 100.0, "D": 0.0})["A"] == 1 / MAX_SCALE
    assert group_scales(sensitivity, chosen, groups, {"A": 1.0, "C": 1.0, "D": 1.0})["D"] == MAX_SCALE
    scaled = {u.name: u.delta_loss for u in rescaled(sensitivity, groups, {"A": 2.0, "C": 0.5, "D": 1.0}).units}
    assert scaled == {"a": {2: 5.0, 8: 1.0}, "b": {2: 5.0, 8: -1.0}, "c": {2: 3.0, 8: 1.0}, "d": {2: 0.0, 8: 0.0}}


@pytest.mark.parametrize(("first_bits", "resolved_bits", "kept"), [(4, 2, "first"), (2, 8, "refined")])
def test_the_allocation_with_the_lower_checked_kl_is_kept(first_bits: int, resolved_bits: int, kept: str) -> None:
    model = make_tiny_llama()
    units = find_units(model)
    table = {name: {2: 1.0, 4: 0.5, 8: 0.0} for name in units}
    windows = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    refinement = refine_allocation(
        model, units, "model.layers", sensitivity_of(table), dict.fromkeys(units, first_bits),
        quantized_at(units, first_bits), windows, solve=lambda _: dict.fromkeys(units, resolved_bits),
        quantize=lambda allocations: [quantized_at(units, next(iter(c.values()))) for c in allocations])
    report = refinement.report
    assert report["kept"] == kept and report["changed_units"] == (len(units) if kept == "refined" else 0)
    # every damping gives the same allocation here: it is quantized and checked once
    checked = sorted({c["kl"] for c in report["candidates"]})
    assert len(report["candidates"]) == 3 and len(checked) == 1 and report["quantized_allocations"] == 1
    assert (checked[0] < report["kl_first"]) == (kept == "refined")
    assert report["kl_kept"] == min(checked[0], report["kl_first"])
    assert set(refinement.chosen.values()) == {first_bits if kept == "first" else resolved_bits}
    assert report["kl_first"] == pytest.approx(output_kl(model, units, {
        n: dequantize_weight(q) for n, q in quantized_at(units, first_bits).items()}, [windows[1:]]), rel=1e-6)


def test_pipeline_with_kl_refinement(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=3.5, num_samples=4, seq_len=32, group_size=64,
                             kl_refine_windows=2)
    result = run_pipeline(spec, out=tmp_path / "out", use_cache=False)
    manifest = json.loads((Path(result.artifact) / MANIFEST).read_text())
    report = manifest["kl_refinement"]
    assert report["scale_windows"] == 2 and report["check_windows"] == 2
    assert set(report["block_scales"]) == {"model.layers.0", "model.layers.1"}
    assert report["kept"] in ("first", "refined") and 0 <= report["kl_kept"] <= report["kl_first"]
    assert result.bits_per_weight <= 3.5 + 1e-9
    assert {unit["name"]: unit["bits"] for unit in manifest["units"]} == {u["name"]: u["bits"] for u in result.units}
    load_artifact(Path(result.artifact))
    with pytest.raises(BitplanError, match="at least 4 calibration samples"):
        JobSpec.from_flat(model="x", bits_per_weight=3.0, num_samples=3, kl_refine_windows=2)


def test_refinement_is_cancelled_between_groups() -> None:
    from bitplan.sensitivity import Cancelled

    model = make_tiny_llama()
    units = find_units(model)
    windows = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    with pytest.raises(Cancelled):
        refine_allocation(model, units, "model.layers", sensitivity_of({n: {2: 1.0, 8: 0.0} for n in units}),
                          dict.fromkeys(units, 2), quantized_at(units, 2), windows, solve=lambda _: {},
                          quantize=lambda _: [], should_stop=lambda: True)
    assert all(not torch.equal(m.weight, dequantize_weight(quantized_at({n: m}, 2)[n])) for n, m in units.items())
