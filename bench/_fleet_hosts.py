"""The hosts of ``bench/fleet.py``: each one a network namespace joined to the others by a veth pair on one bridge,
and a mount namespace in which a folder of its own is ``/tmp`` (its data folder, scratch, HOME and sensitivity
cache live there) and the checkout is read-only. So a host reaches the others only over the network, and a file
one host writes is not seen by another: what they share must go through Redis or the object store.

Where namespaces are not permitted (no root, a sandbox without ``CAP_SYS_ADMIN``), the same hosts run as plain
processes on loopback with free ports and a private ``TMPDIR``, ``HOME`` and data folder each; ``isolation`` says
which, and the bench prints it. Loaded with ``_own_folder_off_path.sibling("_fleet_hosts")``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "bpfleet"  # names of every namespace, veth and the bridge this module makes (removed again at the end)
BRIDGE = f"{PREFIX}0"
SUBNET = "10.77.0"  # the bridge is .1 (the driver, i.e. the client's machine); hosts from .10
REPOSITORY = Path(__file__).resolve().parents[1]
# Run in the host's mount namespace before its command: its folder becomes /tmp, the checkout read-only.
HOST_SCRIPT = ('mount --bind "$1" /tmp && mount --bind "$2" "$2" && mount -o remount,bind,ro "$2" && shift 2 '
               '&& exec "$@"')


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def namespaces_refused() -> str | None:
    """``None`` when network and mount namespaces, veth pairs, a bridge and a bind-mounted /tmp all work here;
    else why not (the first step that failed, with its error)."""
    probe, veth = f"{PREFIX}-probe", f"{PREFIX}p"
    steps = [["ip", "netns", "add", probe], ["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "x"],
             ["ip", "link", "add", f"{PREFIX}pb", "type", "bridge"],
             ["ip", "netns", "exec", probe, "unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
              "mount -t tmpfs tmpfs /tmp && touch /tmp/probe"]]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                return f"`{' '.join(step[:4])} ...` failed: {done.stderr.strip() or done.returncode}"
        return None
    except (OSError, subprocess.SubprocessError) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        _ip("link", "del", veth, check=False)
        _ip("link", "del", f"{PREFIX}pb", check=False)
        _ip("netns", "del", probe, check=False)


@dataclass
class Host:
    """One machine of the fleet: ``root`` is, seen from the driver, the folder the host sees as its ``/tmp``."""

    name: str
    address: str
    root: Path
    netns: str | None  # None: the fallback (a process on loopback with its own TMPDIR)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def tmp(self) -> str:
        """This host's /tmp as its own processes name it."""
        return "/tmp" if self.netns else str(self.root)

    def inside(self, relative: str) -> str:
        """A path under this host's /tmp, as the host names it."""
        return f"{self.tmp}/{relative}"

    def launch(self, argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        """Start ``argv`` on this host (its own session, so that a signal to its group reaches the job processes
        it spawns), with HOME, TMPDIR and the sensitivity cache in the host's /tmp."""
        own = {**env, "TMPDIR": self.tmp, "HOME": self.inside("home"), "BITPLAN_CACHE_DIR": self.inside("cache")}
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private", "--",
                    "sh", "-c", HOST_SCRIPT, self.name, str(self.root), str(REPOSITORY), *argv]
        with (self.root / f"{log}.log").open("ab") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=own, start_new_session=True)
        self.processes.append(process)
        return process

    def signal_all(self, sig: int) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, process: subprocess.Popen[bytes] | None = None, *, sig: int = signal.SIGTERM,
             grace_s: float = 20.0) -> None:
        """``sig`` to one process group (else all of this host's), SIGKILL to what is left after ``grace_s``."""
        chosen = [process] if process is not None else list(self.processes)
        for each in chosen:
            try:
                os.killpg(each.pid, sig)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + grace_s
        for each in chosen:
            try:
                each.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(each.pid, signal.SIGKILL)
                each.wait(timeout=10)
            self.processes.remove(each)

    def remaining_pids(self) -> list[int]:
        """Processes still alive on this host: every pid in its network namespace (a process that left its group
        is still found), or in the fallback every pid in the groups it started."""
        if self.netns:
            return [int(pid) for pid in _ip("netns", "pids", self.netns, check=False).stdout.split()]
        alive = []
        for process in self.processes:
            try:
                os.killpg(process.pid, 0)
                alive.append(process.pid)
            except ProcessLookupError:
                pass
        return alive


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def remove_network() -> None:
    """Every namespace and the bridge this module made (a crashed earlier run's too); deleting a namespace
    deletes the veth end inside it, and with it the pair."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX):
            _ip("netns", "del", name, check=False)
    _ip("link", "del", BRIDGE, check=False)
    deadline = time.monotonic() + 10  # a namespace's devices go a moment after it (asynchronously)
    while PREFIX in _ip("-o", "link", "show", check=False).stdout and time.monotonic() < deadline:
        time.sleep(0.2)


def make_hosts(names: list[str], base: Path, *, namespaces: bool) -> list[Host]:
    """One :class:`Host` per name, its /tmp under ``base/<name>``; with ``namespaces`` each is a network namespace
    whose only link (``eth0``) is a veth pair on the bridge ``BRIDGE`` (addressed ``SUBNET.1``, the driver)."""
    hosts = []
    if namespaces:
        remove_network()
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
    for index, name in enumerate(names):
        root = base / name
        root.mkdir(parents=True)
        if not namespaces:
            hosts.append(Host(name, "127.0.0.1", root, None))
            continue
        netns, outer, address = f"{PREFIX}-{name}", f"{PREFIX}h{index}", f"{SUBNET}.{10 + index}"
        _ip("netns", "add", netns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", f"{PREFIX}n{index}")
        _ip("link", "set", f"{PREFIX}n{index}", "netns", netns)
        _ip("-n", netns, "link", "set", f"{PREFIX}n{index}", "name", "eth0")
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        for device in ("lo", "eth0"):
            _ip("-n", netns, "link", "set", device, "up")
        _ip("link", "set", outer, "master", BRIDGE)
        _ip("link", "set", outer, "up")
        hosts.append(Host(name, address, root, netns))
    return hosts


def links(host: Host) -> list[str]:
    """The network devices a host sees (``lo`` and ``eth0``, a veth, in a namespace)."""
    if host.netns is None:
        return []
    shown = _ip("-n", host.netns, "-o", "link", "show", check=False).stdout.splitlines()
    return [line.split(":")[1].strip().split("@")[0] + (" (veth)" if "veth" in line or "@if" in line else "")
            for line in shown]


def token() -> str:
    return uuid.uuid4().hex
