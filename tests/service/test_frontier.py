"""Issue 18: a job's frontier as an API (``GET /v1/jobs/{id}/frontier``) and more budgets of a finished job
(``POST /v1/jobs/{id}/artifacts``), on the embedded backend with a real tiny model."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bitplan.allocator import AllocationProblem, Budget, Option, Unit, problem_from_json, problem_to_json
from bitplan.allocator.frontier import frontier
from bitplan.report.frontier import PROBLEM_FILE, job_frontier
from bitplan.service.app import create_app
from tests.service.test_jobs import SMALL, settings_for, wait_for


@pytest.fixture()
def swept(tmp_path: Path, tiny_llama_dir: Path):
    """A service and a succeeded sweep of three budgets on the tiny model."""
    with TestClient(create_app(settings_for(tmp_path, tiny_llama_dir))) as client:
        response = client.post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": [3.0, 4.0, 6.0],
                                                 **SMALL})
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"], {"succeeded", "failed"})
        assert job["status"] == "succeeded", job["error"]
        yield client, job


def test_issue18_frontier_of_a_sweep_agrees_with_bitplan_allocate(swept, tmp_path: Path) -> None:
    client, job = swept
    started = time.perf_counter()
    response = client.get(f"/v1/jobs/{job['id']}/frontier")
    seconds = time.perf_counter() - started
    assert response.status_code == 200, response.text
    body = response.json()
    points = body["points"]
    assert body["kind"] == "exact" and len(points) > 3 and seconds < 5
    assert [p["bytes"] for p in points] == sorted(p["bytes"] for p in points)
    assert all(b["predicted_loss"] <= a["predicted_loss"] for a, b in zip(points, points[1:], strict=False))
    assert all(abs(p["bits_per_weight"] - 8 * p["bytes"] / body["numel"]) < 1e-9 for p in points)
    # the uniform baselines: one per candidate width, each no better than the frontier at its size
    assert sorted(u["bits"] for u in body["uniform"]) == [2, 3, 4, 8]
    for baseline in body["uniform"]:
        best = min((p["predicted_loss"] for p in points if p["bytes"] <= baseline["bytes"] + 1e-6), default=None)
        assert best is not None and best <= baseline["predicted_loss"] + 1e-9
    # the three artifacts, measured, each predicted on the frontier at its own size (the solver is exact)
    measured = body["measured"]
    assert [m["artifact"] for m in measured] == [a["id"] for a in job["artifacts"]]
    for point in measured:
        assert point["kl_mean"] > 0 and point["ppl"] > 0 and point["eval_text"]
        best = min(p["predicted_loss"] for p in points if p["bytes"] <= point["bytes"] + 1e-6)
        assert point["predicted_loss"] == pytest.approx(best, rel=1e-6, abs=1e-9)
    # the same problem file through `bitplan allocate --frontier` gives the same points
    problem = client.get(f"/v1/artifacts/{job['artifacts'][0]['id']}/files/{PROBLEM_FILE}")
    assert problem.status_code == 200
    path = tmp_path / "problem.json"
    path.write_bytes(problem.content)
    cli = subprocess.run([sys.executable, "-m", "bitplan.cli", "allocate", "--problem", str(path), "--frontier",
                          "--json"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    from_cli = json.loads(cli.stdout)
    assert [(p["bytes"], p["objective"]) for p in from_cli] == [(p["bytes"], p["predicted_loss"]) for p in points]
    hull = client.get(f"/v1/jobs/{job['id']}/frontier", params={"kind": "hull"}).json()
    assert hull["kind"] == "hull" and {p["bytes"] for p in hull["points"]} <= {p["bytes"] for p in points}
    table = client.get(f"/v1/jobs/{job['id']}/frontier", params={"format": "csv"})
    assert table.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert [r["series"] for r in rows].count("predicted") == len(points)
    assert [r["series"] for r in rows].count("measured") == 3


def test_issue18_more_budgets_come_from_the_cached_sensitivity(swept) -> None:
    client, job = swept
    response = client.post(f"/v1/jobs/{job['id']}/artifacts", json={"bits_per_weight": [3.5, 5.0]})
    assert response.status_code == 202, response.text
    more = wait_for(client, response.json()["id"], {"succeeded", "failed"})
    assert more["status"] == "succeeded", more["error"]
    assert more["request"]["budget"]["bits_per_weight"] == [3.5, 5.0]
    manifest = client.get(f"/v1/artifacts/{more['artifacts'][0]['id']}/files/manifest.json").json()
    assert manifest["calibration"]["sensitivity_cache"] == "hit"  # not measured again
    first = client.get(f"/v1/jobs/{job['id']}/frontier").json()
    second = client.get(f"/v1/jobs/{more['id']}/frontier").json()
    assert first["points"] == second["points"]  # the same problem: the same frontier
    assert all(round(m["bits_per_weight"], 6) <= b for m, b in zip(second["measured"], [3.5, 5.0], strict=True))


def test_issue18_frontier_and_more_budgets_refuse_clearly(swept, tiny_llama_dir: Path) -> None:
    client, job = swept
    assert client.get("/v1/jobs/nope/frontier").status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}/frontier", params={"format": "xml"}).status_code == 422
    assert client.get(f"/v1/jobs/{job['id']}/frontier", params={"axis": "watts"}).status_code == 422
    untimed = client.get(f"/v1/jobs/{job['id']}/frontier", params={"axis": "latency"})
    assert untimed.status_code == 409 and "no latency budget" in untimed.json()["detail"]
    for body in ({}, {"bits_per_weight": 4.0, "bytes": 1000}, {"bits_per_weight": 0.5}, {"extra": 1},
                 {"bits_per_weight": [4.0] * 20}):
        refused = client.post(f"/v1/jobs/{job['id']}/artifacts", json=body)
        assert refused.status_code == 422, (body, refused.text)
        assert refused.json()["detail"]
    uniform = client.post("/v1/jobs", json={"model": tiny_llama_dir.name, "uniform_bits": 4, **SMALL}).json()
    wait_for(client, uniform["id"], {"succeeded"})
    refused = client.get(f"/v1/jobs/{uniform['id']}/frontier")
    assert refused.status_code == 409 and "uniform" in refused.json()["detail"]


def test_problem_json_round_trips_and_labels_make_uniform_points() -> None:
    problem = AllocationProblem(
        units=(Unit(name="a", options=(Option(bits=4, bytes=10, distortion=2.0), Option(bits=4, bytes=12,
                                                                                         distortion=1.5),
                                       Option(bits=8, bytes=20, distortion=0.1)), tie="t"),
               Unit(name="b", options=(Option(bits=4, bytes=12, distortion=1.0), Option(bits=8, bytes=20,
                                                                                        distortion=0.0)),
                    min_bits=4, max_bits=8)),
        budget=Budget(bytes=40))
    labels = {"a": ["Q4_K", "Q4_0", "Q8_0"], "b": ["Q4_0", "Q8_0"]}
    document = {**problem_to_json(problem, labels), "numel": 80}
    assert problem_from_json(json.loads(json.dumps(document))) == problem
    report = job_frontier(document, [])
    uniform = {u["bits"]: u for u in report["uniform"]}
    assert uniform[4]["bytes"] == 22 and uniform[4]["formats"] == ["Q4_0", "Q4_K"]  # each unit's first 4-bit
    assert uniform[8]["predicted_loss"] == pytest.approx(0.1)
    assert [(p["bytes"], p["predicted_loss"]) for p in report["points"]] == [
        (p["bytes"], p["objective"]) for p in frontier(problem)[0]]


def test_fast_hull_path_matches_the_allocator_and_thinning_keeps_the_ends() -> None:
    from bitplan.report.frontier import predicted_frontier

    rng = np.random.default_rng(3)
    units = tuple(Unit(name=f"u{i}", options=tuple(Option(bits=b, bytes=float(rng.integers(50, 90)) * b,
                                                          distortion=float(rng.lognormal()) * 4.0 ** -b)
                                                   for b in (2, 3, 4, 8))) for i in range(300))
    problem = AllocationProblem(units=units, budget=Budget(bytes=1e6))
    document = {**problem_to_json(problem), "numel": 300 * 128}
    sizes, costs, kind = predicted_frontier(document, kind="auto", max_points=100)  # 300 units > 100: hull
    reference, reference_kind = frontier(problem, kind="hull")
    assert kind == reference_kind == "hull"
    assert sizes.tolist() == [p["bytes"] for p in reference] and costs.tolist() == [p["objective"] for p in reference]
    tied = {**document, "units": [{**u, "tie": "t"} if i < 2 else u for i, u in enumerate(document["units"])]}
    tied_sizes, _, _ = predicted_frontier(tied, kind="hull")  # ties: through the problem's objects
    assert tied_sizes.tolist() == [p["bytes"] for p in frontier(problem_from_json(tied), kind="hull")[0]]
    report = job_frontier(document, [], kind="hull", limit=50)
    assert report["total_points"] == len(reference) > 50 and len(report["points"]) == 50
    assert report["points"][0]["bytes"] == reference[0]["bytes"]
    assert report["points"][-1]["bytes"] == reference[-1]["bytes"]


def test_issue18_eval_text_under_a_root_is_what_the_quality_report_measures(tmp_path: Path,
                                                                          tiny_llama_dir: Path) -> None:
    text = tiny_llama_dir.parent / "eval-prose.txt"
    text.write_text(" ".join(f"word{i % 97} the of and" for i in range(3000)) + "\n")
    with TestClient(create_app(settings_for(tmp_path, tiny_llama_dir))) as client:
        for bad, reason in (("../etc/passwd", "'..'"), ("missing.txt", "not a file"), ("a\x00b", "plain path")):
            refused = client.post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": 4.0,
                                                    "eval_text": bad, **SMALL})
            assert refused.status_code == 422 and refused.json()["param"] == "eval_text", refused.text
            assert reason in refused.json()["detail"]
        response = client.post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": [4.0],
                                                 "eval_text": text.name, "quality_seq_len": 64, **SMALL})
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"], {"succeeded", "failed"})
        assert job["status"] == "succeeded", job["error"]
        (point,) = client.get(f"/v1/jobs/{job['id']}/frontier").json()["measured"]
        assert point["eval_text"].endswith("eval-prose.txt") and point["ppl"] > 0
        assert job["allocation"][0]["quality"]["seq_len"] == 64
