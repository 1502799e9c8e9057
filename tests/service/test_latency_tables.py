"""Issue 19: a latency table measured on one machine, uploaded for jobs that plan for it (``/v1/latency-tables``),
per key, validated; a job names it by id."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from bitplan.service.app import create_app, hash_key
from tests.bitplan.test_latency import table
from tests.service.test_jobs import settings_for


def test_issue19_upload_list_and_use_a_latency_table(tmp_path: Path, tiny_llama_dir: Path) -> None:
    keys = {hash_key("k1"): "alice", hash_key("k2"): "bob"}
    settings = settings_for(tmp_path, tiny_llama_dir, api_keys=keys, embedded_worker=False)
    alice, bob = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
    with TestClient(create_app(settings)) as client:
        body = table().to_json()
        created = client.post("/v1/latency-tables", json=body, headers=alice)
        assert created.status_code == 201, created.text
        table_id = created.json()["id"]
        assert table_id == table().key and created.headers["location"] == f"/v1/latency-tables/{table_id}"
        assert [t["id"] for t in client.get("/v1/latency-tables", headers=alice).json()["items"]] == [table_id]
        assert client.get("/v1/latency-tables", headers=bob).json()["items"] == []  # each key sees its own
        assert client.get(f"/v1/latency-tables/{table_id}", headers=bob).status_code == 404
        assert client.get(f"/v1/latency-tables/{table_id}", headers=alice).json()["types"] == body["types"]
        for bad, param in (({**body, "types": ["int4-g32"]}, "types"),
                           ({**body, "decode_ms_per_mweight": {"Q4_0": 1.0}}, "decode_ms_per_mweight"),
                           ({**body, "model_sha256": "nope"}, "model_sha256"),
                           ({**body, "version": 7}, "latency_table"),
                           ({**body, "surprise": 1}, "surprise")):
            refused = client.post("/v1/latency-tables", json=bad, headers=alice)
            assert refused.status_code == 422 and refused.json()["param"] == param, refused.text
        job = {"model": "smollm2-135m", "target": "gguf", "latency_ms_per_token": 9.0}
        accepted = client.post("/v1/jobs", json={**job, "latency_table": table_id}, headers=alice)
        assert accepted.status_code == 202, accepted.text
        stored = accepted.json()["request"]["budget"]["latency_table"]
        assert json.loads(Path(stored).read_text())["key"] == table_id
        refused = client.post("/v1/jobs", json={**job, "latency_table": table_id}, headers=bob)
        assert refused.status_code == 422 and refused.json()["param"] == "latency_table"
        assert "POST /v1/latency-tables" in refused.json()["detail"]
