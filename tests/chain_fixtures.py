"""A real anvil node for the chain tests, and a TCP connection counter read from /proc/net/tcp.

anvil comes from ``npm ci`` at the repository root (package.json pins @foundry-rs/anvil). When it is
missing the tests FAIL: a chain test that silently skips would pass CI without testing anything. Only
for local iteration, RUNNER_TEST_ALLOW_NO_ANVIL=1 turns that failure into a skip (never set it in CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ANVIL_IN_NODE_MODULES = ROOT / "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"


def anvil_binary() -> Path | None:
    explicit = os.environ.get("RUNNER_TEST_ANVIL")
    if explicit:
        return Path(explicit)
    if ANVIL_IN_NODE_MODULES.exists():
        return ANVIL_IN_NODE_MODULES
    found = shutil.which("anvil")
    return Path(found) if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Anvil:
    binary: Path
    port: int
    state: Path | None = None
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        # --max-persisted-states 0: anvil otherwise writes old states under ~/.foundry/anvil/tmp and leaves
        # them behind when it is killed (78 GB there after these tests and the benchmarks ran for a while)
        args = [str(self.binary), "--host", "127.0.0.1", "--port", str(self.port), "--silent",
                "--max-persisted-states", "0"]
        if self.state is not None:
            args += ["--state", str(self.state)]  # load at start, dump at exit: blocks, logs, nonces survive
        if self.log is not None:
            with open(self.log, "ab") as sink:  # the child keeps its own descriptor
                self.proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        else:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"anvil exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("anvil did not listen within 20s")

    def stop(self) -> None:
        """SIGTERM (anvil dumps --state on the way out) and wait.

        With --state, mining stops first: anvil keeps serving while it dumps, and a block it mines then
        has had its receipt given out but is not in the dump (under two CPU hogs, 1-3 of ~450 acknowledged
        transactions per stop came back unknown). That is a node forgetting a mined block, a reorg, not
        the outage these tests mean; transactions sent after this stay in the mempool and die with it."""
        if self.proc is not None and self.proc.poll() is None:
            if self.state is not None:
                self._rpc("evm_setAutomine", [False])
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _rpc(self, method: str, params: list[object]) -> None:
        request = urllib.request.Request(self.url, json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                                                               "params": params}).encode(),
                                         {"Content-Type": "application/json"})
        with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()


def require_anvil() -> Path:
    binary = anvil_binary()
    if binary is None or not binary.exists():
        message = "anvil is not installed: run `npm ci` at the repository root (package.json pins @foundry-rs/anvil)"
        if os.environ.get("RUNNER_TEST_ALLOW_NO_ANVIL") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return binary


@pytest.fixture
def anvil(tmp_path: Path) -> Iterator[Anvil]:
    node = Anvil(require_anvil(), free_port(), state=tmp_path / "anvil-state.json", log=tmp_path / "anvil.log")
    node.start()
    yield node
    node.stop()


# --- counting TCP connections to the node --------------------------------------------------------------
ESTABLISHED = "01"


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except (FileNotFoundError, PermissionError):
        return inodes
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def connections_to(port: int, pid: int | None = None) -> list[tuple[int, str]]:
    """(local port, state) of client sockets whose remote port is ``port`` (from /proc/net/tcp and tcp6);
    with ``pid``, only the sockets that process holds (matched by inode)."""
    owned = _socket_inodes(pid) if pid is not None else None
    found: list[tuple[int, str]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
            if int(remote.rsplit(":", 1)[1], 16) != port:
                continue
            if owned is not None and inode not in owned:
                continue
            found.append((int(local.rsplit(":", 1)[1], 16), state))
    return found


def client_ports_seen(port: int) -> set[int]:
    """Client ports of every connection to ``port`` the kernel still lists (either end, TIME_WAIT included):
    a connection closed by the server leaves its TIME_WAIT entry on the server's side."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            local, remote, state = int(parts[1].rsplit(":", 1)[1], 16), int(parts[2].rsplit(":", 1)[1], 16), parts[3]
            if state == "0A":  # LISTEN
                continue
            if remote == port:
                ports.add(local)
            elif local == port:
                ports.add(remote)
    return ports


def established_to(port: int, pid: int | None = None) -> int:
    return sum(1 for _, state in connections_to(port, pid) if state == ESTABLISHED)
