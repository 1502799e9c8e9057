"""Long fuzzing run of model-file registration and loading (issue 15): ``--cases N`` mutations of a tiny
safetensors model and of a tiny GGUF, each registered through the API (``POST /v1/models``) and, when accepted,
loaded by the pipeline's loader. Prints JSON: cases per format, HTTP statuses seen, loads that worked or failed
with ModelReferenceError, and every violation (a 5xx, another exception, a case over ``--case-timeout`` s)."""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _own_folder_off_path
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, seed, settings

from bitplan.errors import ModelReferenceError
from bitplan.service.app import ServiceSettings, create_app
from bitplan.sources.models import load_model


def run_format(client: TestClient, root: Path, name: str, original: bytes, strategy: Any, mutate: Any,
               cases: int, case_timeout: float) -> dict[str, Any]:
    counts: dict[str, Any] = {"cases": 0, "status": collections.Counter(), "loaded": 0, "load_refused": 0,
                              "violations": []}
    target = root / "st" / "model.safetensors" if name == "safetensors" else root / "m.gguf"
    reference = "st" if name == "safetensors" else "m.gguf"

    @seed(15)
    @settings(max_examples=cases, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(mutation=strategy)
    def one(mutation: tuple) -> None:
        target.write_bytes(mutate(original, mutation))
        started = time.monotonic()
        counts["cases"] += 1
        response = client.post("/v1/models", json={"reference": reference})
        counts["status"][str(response.status_code)] += 1
        if response.status_code >= 500:
            counts["violations"].append({"mutation": repr(mutation), "status": response.status_code})
        if response.status_code == 201:
            try:
                load_model(str(target.parent if name == "safetensors" else target))
                counts["loaded"] += 1
            except ModelReferenceError:
                counts["load_refused"] += 1
            except Exception as error:  # noqa: BLE001 - a violation to report
                counts["violations"].append({"mutation": repr(mutation), "error": f"{type(error).__name__}: {error}"})
        if time.monotonic() - started > case_timeout:
            counts["violations"].append({"mutation": repr(mutation), "slow_s": round(time.monotonic() - started, 1)})

    one()
    counts["status"] = dict(counts["status"])
    return counts


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny model and mutations
    from tests.conftest import _word_tokenizer, make_tiny_llama
    from tests.fuzz.model_files import (
        gguf_mutation,
        mutate_gguf,
        mutate_safetensors,
        safetensors_mutation,
        write_tiny_gguf,
    )

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=2000, help="mutations per format")
    parser.add_argument("--case-timeout", type=float, default=10.0)
    args = parser.parse_args()
    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="bitplan-fuzz-bench-"))
    root = base / "root"
    make_tiny_llama().save_pretrained(root / "st", safe_serialization=True)
    _word_tokenizer(512).save_pretrained(root / "st")
    write_tiny_gguf(base / "tiny.gguf")
    originals = {"safetensors": (root / "st" / "model.safetensors").read_bytes(),
                 "gguf": (base / "tiny.gguf").read_bytes()}
    app = create_app(ServiceSettings(data_dir=base / "data", model_roots=[root], embedded_worker=False))
    report: dict[str, Any] = {"provenance": _own_folder_off_path.sibling("_provenance").provenance(),
                              "cases_per_format": args.cases}
    with TestClient(app, raise_server_exceptions=False) as client:
        report["safetensors"] = run_format(client, root, "safetensors", originals["safetensors"],
                                           safetensors_mutation(), mutate_safetensors, args.cases, args.case_timeout)
        report["gguf"] = run_format(client, root, "gguf", originals["gguf"], gguf_mutation(), mutate_gguf,
                                    args.cases, args.case_timeout)
    shutil.rmtree(base, ignore_errors=True)
    report["violations"] = len(report["safetensors"]["violations"]) + len(report["gguf"]["violations"])
    report["total_s"] = round(time.perf_counter() - started, 1)
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
