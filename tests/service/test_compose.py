"""docker/compose.yaml (issue 44): an object store and workers that scale (``--scale worker=3``), sharing nothing
with the API but Redis and the store. Checked by ``docker compose config`` where docker compose exists, and by
reading the file everywhere."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.yaml"


def _mounts(service: dict[str, Any]) -> set[str]:
    """The volumes a service mounts (named volumes and host folders), by source."""
    found = set()
    for volume in service.get("volumes", []):
        found.add(volume.split(":")[0] if isinstance(volume, str) else str(volume.get("source")))
    return found


def _check(config: dict[str, Any]) -> None:
    services = config["services"]
    assert {"api", "worker", "redis", "objects"} <= set(services)
    api, worker = services["api"], services["worker"]
    assert _mounts(api) & _mounts(worker) == set()  # nothing shared but Redis and the store
    assert _mounts(worker) == set()  # a worker's scratch is its own container's
    assert "container_name" not in worker and not worker.get("ports")  # so that --scale worker=3 works
    for service in (api, worker):
        environment = service["environment"]
        assert str(environment["BITPLAN_STORE"]).startswith("s3://")
        assert environment["AWS_ENDPOINT_URL"] == "http://objects:8333"
        assert environment["BITPLAN_REDIS_URL"].startswith("redis://redis:")
    assert "--no-worker" in api["command"] and worker["command"][0] == "worker"


def test_issue44_compose_file_shares_nothing_but_redis_and_the_store() -> None:
    _check(yaml.safe_load(COMPOSE.read_text()))


def test_issue44_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed here: docker compose config cannot run")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker is installed without the compose plugin: docker compose config cannot run")
    project = tmp_path / "docker"  # a copy beside its secret file, so the check needs nothing of the checkout
    project.mkdir()
    shutil.copy(COMPOSE, project / "compose.yaml")
    (project / "api-keys.txt").write_text("team:secret\n")
    done = subprocess.run([docker, "compose", "-f", str(project / "compose.yaml"), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    _check(json.loads(done.stdout))
