"""Issue 44: the hosts of ``bench/fleet.py`` (two here, the bench runs five) are isolated as the bench claims: each
reaches the other only over its veth link, sees its own /tmp and cannot write the checkout; and nothing of the
network is left once it is removed. Needs root and namespaces: skipped otherwise (the bench then falls back to
plain processes and says so)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def hosts_module() -> Any:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    spec = importlib.util.spec_from_file_location("bench_fleet_hosts", BENCH / "_fleet_hosts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.PREFIX, module.BRIDGE = "bptest", "bptest0"  # apart from a bench fleet running now
    refused = module.namespaces_refused()
    if refused is not None:
        pytest.skip(f"namespaces not permitted here: {refused}")
    return module


@pytest.fixture
def two_hosts(hosts_module: Any, tmp_path: Path) -> Iterator[list[Any]]:
    hosts = hosts_module.make_hosts(["left", "right"], tmp_path, namespaces=True)
    try:
        yield hosts
    finally:
        for host in hosts:
            host.stop(grace_s=5.0)
        hosts_module.remove_network()


def _run(host: Any, code: str, log: str) -> str:
    process = host.launch([sys.executable, "-c", code], dict(os.environ), log)
    process.wait(timeout=60)
    host.processes.remove(process)
    return (host.root / f"{log}.log").read_text()


def test_issue44_fleet_hosts_talk_over_veth_only_with_their_own_tmp(hosts_module: Any, two_hosts: list[Any]
                                                                    ) -> None:
    left, right = two_hosts
    assert hosts_module.links(left) == ["lo", "eth0 (veth)"]
    server = left.launch([sys.executable, "-c", (  # on every address of the left host, its loopback too
        "import socket\n"
        "s = socket.create_server(('0.0.0.0', 7001))\n"
        "c, _ = s.accept(); c.sendall(b'hello from left'); c.close()\n"
        "import time; time.sleep(3)  # still listening while the right host tries its own loopback\n")],
        dict(os.environ), "server")
    client = _run(right, (
        "import socket, time\n"
        "for _ in range(100):\n"
        "    try:\n"
        f"        print(socket.create_connection(('{left.address}', 7001), timeout=5).recv(64).decode()); break\n"
        "    except ConnectionRefusedError:\n"
        "        time.sleep(0.1)\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 7001), timeout=2)\n"
        "except OSError as error:\n"
        "    print('own loopback:', type(error).__name__)\n"), "client")
    # the left host is reached over the link; the right host's loopback is its own (the left's port is not there)
    assert "hello from left" in client and "own loopback: ConnectionRefusedError" in client
    server.wait(timeout=30)
    left.processes.remove(server)
    written = _run(left, "import os\nopen('/tmp/left-only', 'w').write('x')\nprint(sorted(os.listdir('/tmp')))\n"
                   f"try:\n    open('{hosts_module.REPOSITORY}/fleet-probe', 'w')\nexcept OSError as e:\n"
                   "    print('checkout', e.strerror)\n", "tmp")
    assert "checkout Read-only file system" in written
    assert (left.root / "left-only").is_file() and not (right.root / "left-only").exists()
    assert not Path("/tmp/left-only").exists() and not (hosts_module.REPOSITORY / "fleet-probe").exists()
    assert left.remaining_pids() == [] and right.remaining_pids() == []


def test_issue44_removing_the_fleet_network_leaves_nothing(hosts_module: Any, tmp_path: Path) -> None:
    hosts_module.make_hosts(["one"], tmp_path, namespaces=True)
    hosts_module.remove_network()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    devices = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert hosts_module.PREFIX not in namespaces and hosts_module.PREFIX not in devices
