"""The command-line contracts, run as a user would: JSON on the last stdout line, errors with their exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def bitplan(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "bitplan.cli", *args], capture_output=True, text=True,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def last_json(result: subprocess.CompletedProcess[str]) -> object:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_models_json() -> None:
    models = last_json(bitplan("models", "--json"))
    assert {"smollm2-135m", "minilm-l6"} <= {m["id"] for m in models}


def test_run_then_eval(tiny_llama_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "eval.txt"
    text.write_text("\n".join(["The statement is executed when the condition is true ."] * 40))
    out = tmp_path / "artifact"
    run = last_json(bitplan("run", "--model", str(tiny_llama_dir), "--bpw", "4", "--out", str(out), "--json",
                            "--samples", "2", "--seq-len", "32", "--group-size", "64"))
    assert run["artifact"] == str(out.resolve())
    assert run["bits_per_weight"] <= 4 and run["status"] == "optimal"
    assert {"bytes", "objective", "lower_bound", "units"} <= set(run)
    assert {"name", "bits", "group_size"} <= set(run["units"][0])
    quantized = last_json(bitplan("eval", "--artifact", str(out), "--text", str(text), "--seq-len", "16",
                                  "--max-windows", "4", "--json"))
    assert quantized["tokens"] == 64 and quantized["ppl"] > 1
    floating = last_json(bitplan("eval", "--model", str(tiny_llama_dir), "--text", str(text), "--seq-len", "16",
                                 "--max-windows", "4", "--json"))
    assert floating["tokens"] == 64 and floating["ppl"] != quantized["ppl"]


def test_uniform_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run = last_json(bitplan("run", "--model", str(tiny_llama_dir), "--uniform-bits", "3", "--out",
                            str(tmp_path / "u"), "--json", "--group-size", "64"))
    assert {u["bits"] for u in run["units"]} == {3} and run["status"] == "uniform"


@pytest.mark.parametrize("args, message", [
    (["run", "--model", "nope", "--bpw", "4", "--out", "x"], "neither a bundled id"),
    (["run", "--model", "m.pt", "--bpw", "4", "--out", "x"], "Convert the weights to safetensors"),
    (["run", "--model", "smollm2-135m", "--bpw", "0.5", "--out", "x"], "below the smallest achievable size"),
    (["eval", "--artifact", "/nonexistent", "--text", "x.txt"], "not a bitplan artifact"),
    (["allocate", "--problem", "/nonexistent.json"], "problem file not found"),
    (["run", "--model", "smollm2-135m", "--bpw", "inf", "--out", "x"], "positive finite number"),
    (["run", "--model", "smollm2-135m", "--bpw", "3,abc", "--out", "x"], "--bpw takes a number"),
    (["eval", "--model", "minilm-l6", "--text", "x.txt"], "perplexity needs a causal language model"),
])
def test_bad_input_exits_with_its_code_and_reason(args: list[str], message: str) -> None:
    """Exit 3 for input the command refused; 2 is argparse's, for the command line itself (a --bpw that is not
    a number list is refused by the flag's parser)."""
    result = bitplan(*args, check=False)
    assert result.returncode == (2 if "--bpw takes" in message else 3)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_issue14_exit_codes_and_json_errors() -> None:
    usage = bitplan("run", "--bogus", check=False)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    refused = bitplan("run", "--model", "nope", "--bpw", "4", "--out", "x", "--json", check=False)
    error = json.loads(refused.stdout.splitlines()[-1])["error"]
    assert refused.returncode == 3 and error["exit_code"] == 3
    assert error["code"] == "invalid_model" and error["param"] == "model" and "neither a bundled id" in error["message"]
    unreachable = subprocess.run([sys.executable, "-m", "bitplan.service.cli", "status", "--url",
                                  "http://127.0.0.1:9", "some-job", "--json"], capture_output=True, text=True,
                                 timeout=120, env={**os.environ, "BITPLAN_URL": "http://127.0.0.1:9"})
    assert unreachable.returncode == 4, unreachable.stderr
    assert json.loads(unreachable.stdout.splitlines()[-1])["error"]["code"] == "service_unreachable"


def test_allocate_contract(tmp_path: Path) -> None:
    problem = {"units": [{"name": f"u{i}", "options": [{"bits": 2, "bytes": 10, "distortion": 5.0 + i},
                                                      {"bits": 4, "bytes": 20, "distortion": 1.0}]}
                         for i in range(3)],
               "budget": {"bytes": 50}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(problem))
    result = last_json(bitplan("allocate", "--problem", str(path), "--json"))
    assert result["status"] == "optimal" and result["choice"] == [0, 1, 1]
    assert result["objective"] == 7.0 and result["bytes"] == 50 and result["lower_bound"] <= 7.0
    fast = last_json(bitplan("allocate", "--problem", str(path), "--json", "--solver", "lagrangian"))
    assert fast["objective"] == 7.0 and fast["lower_bound"] <= 7.0 and "multiplier" in fast
    frontier = last_json(bitplan("allocate", "--problem", str(path), "--json", "--frontier"))
    assert frontier[0] == {"bytes": 30.0, "objective": 18.0} and frontier[-1] == {"bytes": 60.0, "objective": 3.0}
    problem["budget"]["bytes"] = 20
    path.write_text(json.dumps(problem))
    infeasible = last_json(bitplan("allocate", "--problem", str(path), "--json"))
    assert infeasible["status"] == "infeasible" and infeasible["min_feasible_bytes"] == 30


def test_several_budgets_share_one_sensitivity_pass(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = last_json(bitplan("run", "--model", str(tiny_llama_dir), "--bpw", "3,4.5", "--out", str(tmp_path),
                               "--json", "--samples", "2", "--seq-len", "32", "--group-size", "64"))
    runs = result["runs"]
    assert [Path(r["artifact"]).name for r in runs] == ["bpw-3", "bpw-4.5"]
    assert runs[0]["bits_per_weight"] <= 3 < runs[1]["bits_per_weight"] <= 4.5
    assert runs[0]["objective"] >= runs[1]["objective"]
    assert runs[0]["calibration"]["sha256"] == runs[1]["calibration"]["sha256"]


@pytest.mark.parametrize("metric", ["output_error", "fisher_output_error", "token_fisher", "token_taylor", "token_kl",
                                    "token_taylor_kl", "gwq", "slim_salience", "baq", "hutchinson"])
def test_sensitivity_contract(tiny_llama_dir: Path, metric: str) -> None:
    result = last_json(bitplan("sensitivity", "--model", str(tiny_llama_dir), "--metric", metric, "--json",
                               "--samples", "2", "--seq-len", "16", "--group-size", "64"))
    assert result["metric"] == metric
    unit = result["units"][0]
    assert unit["name"] == "model.layers.0.self_attn.q_proj" and unit["numel"] == 64 * 64
    assert set(unit["delta_loss"]) == {"2", "3", "4", "8"}
    assert unit["delta_loss"]["2"] >= unit["delta_loss"]["8"]
