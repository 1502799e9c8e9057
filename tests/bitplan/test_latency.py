"""Issue 19: latency budgets. The fit, the fitting design, the budget's checks and the solver's use of it, fast;
the whole path (a table measured through llama.cpp on SmolLM2, a job under a latency budget) behind ``slow``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bitplan.allocator import solve_allocation
from bitplan.errors import BitplanError, BudgetError, SpecError
from bitplan.latency import LatencyTable, fit, latency_table, numel_by_type, random_mixtures, variant_assignments
from bitplan.planning import allocation_problem, latency_plan, legal_for_target
from bitplan.spec import JobSpec

TYPES = ["Q4_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0"]
SHAPES = {"a.q": (576, 576), "a.down": (576, 1536), "a.up": (1536, 576)}


def table(**overrides: object) -> LatencyTable:
    values = {"fingerprint": {"cpu": "test"}, "model_sha256": "a" * 64, "types": TYPES, "decode_fixed_ms": 2.0,
              "decode_ms_per_mweight": {"Q4_K": 1.0, "Q6_K": 1.5, "Q4_0": 0.8, "Q5_0": 1.1, "Q8_0": 2.0},
              "prefill_fixed_ms": 1.0, "prefill_ms_per_mweight": dict.fromkeys(TYPES, 0.5), **overrides}
    return LatencyTable(**values)  # type: ignore[arg-type]


def legal(fmt: str, shape: tuple[int, int]) -> bool:
    return legal_for_target("gguf", fmt, shape)


def test_fit_recovers_known_coefficients_and_predicts_unseen_mixtures() -> None:
    truth_fixed, truth = 1.5, {"Q4_0": 0.9, "Q8_0": 2.1, "Q6_K": 1.4}

    def time_of(counts: dict[str, int]) -> float:
        return truth_fixed + sum(truth[t] * n / 1e6 for t, n in counts.items())

    # variants of one model hold the same weights in total: fixed and per-weight parts trade off, predictions not
    same_total = [{"Q4_0": 3_000_000}, {"Q8_0": 3_000_000}, {"Q4_0": 1_000_000, "Q6_K": 2_000_000},
                  {"Q8_0": 500_000, "Q6_K": 2_500_000}, {"Q4_0": 2_000_000, "Q8_0": 1_000_000}]
    fixed, per = fit(list(truth), same_total, [time_of(c) for c in same_total])
    unseen = {"Q4_0": 700_000, "Q8_0": 1_300_000, "Q6_K": 1_000_000}
    predicted = fixed + sum(per[t] * n / 1e6 for t, n in unseen.items())
    assert predicted == pytest.approx(time_of(unseen), rel=1e-6)
    # with totals that vary, every coefficient is identified
    varied = [*same_total, {"Q4_0": 1_000_000}, {"Q8_0": 2_000_000, "Q6_K": 500_000}]
    fixed, per = fit(list(truth), varied, [time_of(c) for c in varied])
    assert fixed == pytest.approx(truth_fixed, rel=1e-6) and per == pytest.approx(truth, rel=1e-6)


def test_fitting_design_covers_every_type_on_legal_tensors_only() -> None:
    design = variant_assignments(SHAPES, TYPES, legal, mixtures=3, seed=1)
    assert set(design[0].values()) == {"Q8_0"}  # the base: the widest type every tensor holds
    used = {fmt for assignment in design for fmt in assignment.values()}
    assert used == set(TYPES)
    for assignment in design:
        assert all(legal(fmt, SHAPES[name]) for name, fmt in assignment.items())
    assert design[1:1 + len(TYPES) - 1] != design[-3:]
    assert random_mixtures(SHAPES, TYPES, legal, count=2, seed=5) == random_mixtures(SHAPES, TYPES, legal, count=2,
                                                                                     seed=5)
    assert numel_by_type({"a.q": "Q4_0", "a.up": "Q4_0"}, {"a.q": 10, "a.up": 5}) == {"Q4_0": 15}
    with pytest.raises(BitplanError, match="Q8_0 or Q4_0"):
        variant_assignments(SHAPES, ["Q4_K"], legal, mixtures=0, seed=0)  # K-quants cannot hold 576-wide rows


def test_latency_budget_is_checked_and_the_solver_meets_it() -> None:
    units = {name: SimpleNamespace(weight=SimpleNamespace(numel=lambda s=shape: s[0] * s[1]))
             for name, shape in SHAPES.items()}
    sizes = {name: {fmt: (shape[0] * shape[1] * bits) // 8 for fmt, bits in (("Q4_0", 4.5), ("Q8_0", 8.5))}
             for name, shape in SHAPES.items()}
    with pytest.raises(BudgetError, match="below the fastest achievable") as refused:
        latency_plan(table(), "cached", units, sizes, budget_ms=2.5)
    assert refused.value.param == "latency_ms_per_token"
    fastest = latency_plan(table(), "cached", units, sizes, budget_ms=100).fastest_ms
    slowest = latency_plan(table(), "cached", units, sizes, budget_ms=100).slowest_ms
    budget = (fastest + slowest) / 2
    plan = latency_plan(table(), "cached", units, sizes, budget_ms=budget)
    sensitivity = SimpleNamespace(units=[SimpleNamespace(name=n, delta_loss={"Q4_0": 1.0 + i, "Q8_0": 0.0})
                                         for i, n in enumerate(SHAPES)])
    high = sum(max(s.values()) for s in sizes.values())
    problem = allocation_problem(sizes, sensitivity, None, high, latency=plan)  # type: ignore[arg-type]
    solved = solve_allocation(problem)
    chosen = {u.name: list(sizes[u.name])[k] for u, k in zip(problem.units, solved.choice, strict=True)}
    assert solved.status.value == "optimal" and plan.predict(chosen) <= budget + 1e-9
    assert "Q8_0" in chosen.values() and "Q4_0" in chosen.values()  # the budget binds: a mixture
    # the most sensitive unit (largest delta) is the one kept at Q8_0 when only one fits
    assert chosen["a.up"] == "Q8_0" or plan.predict({**chosen, "a.up": "Q8_0"}) > budget


def test_latency_spec_rules_and_the_cli_contract(tmp_path: Path) -> None:
    spec = JobSpec.from_flat(model="smollm2-135m", latency_ms_per_token=9.5, target="gguf")
    assert spec.budget.describe() == "9.5 ms per token" and spec.budgets == 1
    assert JobSpec.from_flat(model="smollm2-135m", latency_ms_per_token=9.5, target="gguf", bits_per_weight=4.5)
    for flat, param in (({"latency_ms_per_token": 9.5}, "latency_ms_per_token"),
                        ({"latency_ms_per_token": 9.5, "target": "gguf", "uniform_bits": 4}, "latency_ms_per_token"),
                        ({"latency_ms_per_token": -1.0, "target": "gguf"}, "latency_ms_per_token"),
                        ({}, "bits_per_weight")):
        with pytest.raises(SpecError) as refused:
            JobSpec.from_flat(model="smollm2-135m", **flat)
        assert refused.value.param == param
    run = subprocess.run([sys.executable, "-m", "bitplan.cli", "run", "--model", "smollm2-135m",
                          "--latency-ms-per-token", "9", "--out", str(tmp_path / "o"), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    error = json.loads(run.stdout.strip().splitlines()[-1])["error"]
    assert error["param"] == "latency_ms_per_token" and "--target gguf" in error["message"]


def test_a_table_file_from_another_machine_must_match_the_model(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table().to_json()))
    loaded, source = latency_table("smollm2-135m", "a" * 64, ["Q4_0", "Q8_0"], table_file=path)
    assert source == "file" and loaded == table()
    with pytest.raises(BitplanError, match="another model"):
        latency_table("smollm2-135m", "b" * 64, ["Q4_0"], table_file=path)
    with pytest.raises(BitplanError, match="no timing for Q2_K"):
        latency_table("smollm2-135m", "a" * 64, ["Q2_K"], table_file=path)
    path.write_text("{}")
    with pytest.raises(BitplanError, match="not a bitplan latency table"):
        latency_table("smollm2-135m", "a" * 64, ["Q4_0"], table_file=path)


@pytest.mark.slow
def test_issue19_latency_table_and_a_job_under_a_latency_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """A table measured through llama.cpp on SmolLM2 (one timing round: this checks the path, bench/latency.py
    the accuracy), then a job halfway between the fastest and the slowest decode: predicted within the budget,
    and its GGUF timed by llama.cpp."""
    monkeypatch.setenv("BITPLAN_CACHE_DIR", str(tmp_path / "cache"))
    measured = subprocess.run([sys.executable, "-m", "bitplan.cli", "latency", "--target", "gguf", "--rounds", "1",
                               "--formats", "Q4_0,Q5_0,Q8_0,Q4_K,Q6_K", "--json", "--out", str(tmp_path / "t.json")],
                              capture_output=True, text=True, timeout=1800)
    assert measured.returncode == 0, measured.stderr[-3000:]
    table_json = json.loads(measured.stdout)
    assert table_json["source"] == "measured" and table_json["fit"]["variants"] >= 5
    assert all(v >= 0 for v in table_json["decode_ms_per_mweight"].values())
    again = subprocess.run([sys.executable, "-m", "bitplan.cli", "latency", "--formats", "Q4_0,Q5_0,Q8_0,Q4_K,Q6_K",
                            "--json"], capture_output=True, text=True, timeout=600)
    assert json.loads(again.stdout)["source"] == "cached"
    common = ["--model", "smollm2-135m", "--target", "gguf", "--formats", "Q4_0,Q5_0,Q8_0,Q4_K,Q6_K", "--json"]
    too_fast = subprocess.run([sys.executable, "-m", "bitplan.cli", "run", *common, "--latency-ms-per-token", "0.01",
                               "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=600)
    assert too_fast.returncode == 3
    message = json.loads(too_fast.stdout.strip().splitlines()[-1])["error"]["message"]
    fastest, slowest = (float(x) for x in re.findall(r"(\d+\.\d+) ms per token|slowest is (\d+\.\d+)", message)
                        [0:2] and re.findall(r"achievable (\d+\.\d+).*slowest is (\d+\.\d+)", message)[0])
    assert 0 < fastest < slowest
    budget = (fastest + slowest) / 2
    run = subprocess.run([sys.executable, "-m", "bitplan.cli", "run", *common, "--latency-ms-per-token", f"{budget}",
                          "--samples", "2", "--seq-len", "64", "--quality-windows", "1", "--out", str(tmp_path / "a"),
                          "--quiet"], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    report = result["latency"]
    assert report["table"]["source"] == "cached" and report["predicted_ms_per_token"] <= budget + 1e-9
    assert len({u["format"] for u in result["units"]}) > 1  # the budget binds: a mixture of types
    assert report["measured_ms_per_token"] > 0 and (tmp_path / "a" / "model.gguf").is_file()
