"""The end-of-run checks of ``bench/fleet.py``: every artifact downloaded against its sha256, the bucket's stray
and incomplete objects, and every host's leftover processes and scratch files after it is stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def check_downloads(fleet: Any, job_ids: list[str], folder: Path) -> dict[str, Any]:
    """Every artifact of every job downloaded through the API (the client checks each file's sha256 against
    the listing), then each file hashed again here against the listing and the manifest against the job's."""
    import hashlib

    files, size, bad, artifacts = 0, 0, [], {}
    for job_id in job_ids:
        client = fleet.client(job_id)
        state = client.jobs.get(job_id)
        for artifact in state["artifacts"]:
            artifacts[artifact["id"]] = state["attempt"]
            out = client.artifacts.download(artifact["id"], folder / artifact["id"])
            for entry in client.artifacts.get(artifact["id"])["files"]:
                data = (out / entry["name"]).read_bytes()
                files, size = files + 1, size + len(data)
                if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    bad.append(f"{artifact['id']}/{entry['name']}")
            if hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() != artifact["manifest_sha256"]:
                bad.append(f"{artifact['id']}/manifest.json (job's manifest_sha256)")
    return {"artifacts": len(artifacts), "files": files, "bytes": size, "sha256_mismatches": bad,
            "published": artifacts}


def check_bucket(s3: Any, bucket: str, prefix: str, published: dict[str, int]) -> dict[str, Any]:
    """Objects under ``artifacts/`` that are not a published attempt's, and multipart uploads never completed."""
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys += [item["Key"][len(prefix) + 1:] for item in page.get("Contents", [])]
    expected = tuple(f"artifacts/{aid}/attempt-{attempt}/" for aid, attempt in published.items())
    stray = [key for key in keys if key.startswith("artifacts/") and not key.startswith(expected)]
    cache = [key for key in keys if key.startswith("cache/")]
    uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix + "/").get("Uploads", [])
    return {"objects": len(keys), "models": len({k.split("/")[1] for k in keys if k.startswith("models/")}),
            "cache_entries": len(cache), "stray_artifact_objects": stray,
            "incomplete_uploads": [u["Key"] for u in uploads]}


def check_hosts(hosts: dict[str, Any], cache_bound: int) -> dict[str, Any]:
    """Every host stopped (SIGTERM, SIGKILL after the grace): processes left in its namespace, and in each
    worker's data folder the files beyond its model cache and the cache's bytes against its bound."""
    for name in ("worker-a", "worker-b", "api", "store", "redis"):
        hosts[name].stop(grace_s=3.0 if name == "store" else 30.0)
    stray = {name: host.remaining_pids() for name, host in hosts.items()}
    scratch = {}
    for name in ("worker-a", "worker-b"):
        data = hosts[name].root / "data"
        paths = [p for p in data.rglob("*") if p.is_file()] if data.exists() else []
        cache = [p for p in paths if "model-cache" in p.relative_to(data).parts]
        sensitivity = [p for p in paths if p.relative_to(data).parts[0] == "cache"]  # the shared cache's copies
        scratch[name] = {"files_beyond_cache": sorted(str(p.relative_to(data)) for p in paths
                                                      if p not in cache and p not in sensitivity),
                         "cache_bytes": sum(p.stat().st_size for p in cache), "cache_bound": cache_bound,
                         "sensitivity_cache_files": len(sensitivity),
                         "sensitivity_cache_bytes": sum(p.stat().st_size for p in sensitivity)}
    return {"stray_processes": stray, "scratch": scratch}
