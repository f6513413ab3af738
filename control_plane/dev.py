"""Embedded PostgreSQL clusters for development and tests.

Two clusters live under the state directory, both with ``wal_level=logical``:

* ``pg/main``  -- the catalog database and the pool database;
* ``pg/silos`` -- the "silo server" on which the local provisioner creates one
  database per silo tenant.

The PostgreSQL binaries come from the ``pgserver`` wheel. We drive ``initdb``
and ``pg_ctl`` ourselves (instead of ``pgserver.get_server``) because we need
server settings at initdb time, stale-``postmaster.pid`` recovery and an
explicit stop on Ctrl-C. Clusters listen on a unix socket only: no port can
clash between two stacks side by side.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import pwd
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import psutil

with warnings.catch_warnings():
    # Importing pgserver asks platformdirs for a runtime dir, which warns when
    # XDG_RUNTIME_DIR is unset (CI, containers); we only use its binaries.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

from control_plane.exceptions import EmbeddedStackError, StackAlreadyRunningError

SUPERUSER = "postgres"
SOCKET_PATH_LIMIT = 100  # sun_path is 108 bytes; leave room for "/.s.PGSQL.5432"
PORT = 5432

SERVER_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_wal_senders": "40",
    "max_replication_slots": "40",
    "max_logical_replication_workers": "16",
    "max_worker_processes": "32",
    "max_connections": "400",
    "listen_addresses": "''",
    "shared_buffers": "256MB",
    # An abandoned replication slot must not fill the disk (PITFALLS: Moves).
    "max_slot_wal_keep_size": "4GB",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
}

FAST_TEST_SETTINGS: dict[str, str] = {
    # Test clusters are throw-away: durability knobs only cost time there.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


def _system_user() -> str | None:
    """PostgreSQL refuses to run as root; pgserver's convention is a 'pgserver' user."""
    if platform.system() != "Windows" and os.geteuid() == 0:
        ensure_user_exists("pgserver")
        return "pgserver"
    return None


def _run(binary: str, args: list[str], *, user: str | None, timeout: float = 60) -> str:
    cmd = [str(POSTGRES_BIN_PATH / binary), *args]
    # Temporary files rather than pipes: pg_ctl's daemonised postmaster keeps
    # inherited pipes open and a PIPE reader would hang (pgserver notes the same).
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, user=user, timeout=timeout)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise EmbeddedStackError(f"{binary} {' '.join(args)} failed ({proc.returncode}):\n{text}")
    return text


@dataclass(frozen=True)
class EmbeddedCluster:
    """One PostgreSQL cluster in a data directory."""

    pgdata: Path
    fast: bool = False

    @property
    def socket_dir(self) -> Path:
        if len(str(self.pgdata)) + 16 < SOCKET_PATH_LIMIT:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"tenantctl-{digest}"

    @property
    def log_file(self) -> Path:
        return self.pgdata / "server.log"

    def dsn(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@/{database}?host={self.socket_dir}&port={PORT}"

    def is_initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def initialize(self) -> None:
        if self.is_initialized():
            return
        user = _system_user()
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if user is not None:
            ensure_prefix_permissions(self.pgdata)
            ensure_folder_permissions(POSTGRES_BIN_PATH, stat.S_IRGRP | stat.S_IROTH | 0o011)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
            entry = pwd.getpwnam(user)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        self.pgdata.chmod(0o700)
        _run(
            "initdb",
            ["-D", str(self.pgdata), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--no-instructions"],
            user=user,
        )
        settings = dict(SERVER_SETTINGS)
        if self.fast:
            settings.update(FAST_TEST_SETTINGS)
        settings["unix_socket_directories"] = f"'{self.socket_dir}'"
        settings["port"] = str(PORT)
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write("\n# tenantctl embedded settings\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _postmaster_pid(self) -> int | None:
        pid_file = self.pgdata / "postmaster.pid"
        try:
            first = pid_file.read_text().splitlines()[0]
            return int(first)
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def running_pid(self) -> int | None:
        """PID of the postmaster serving this data directory, if one is alive."""
        pid = self._postmaster_pid()
        if pid is None:
            return None
        try:
            proc = psutil.Process(pid)
            cmdline = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if not cmdline or not cmdline[0].endswith("postgres") or str(self.pgdata) not in cmdline:
            return None
        return pid

    def _recover_stale_pid_file(self) -> None:
        # After a crash (kill -9, power loss, container restart) postmaster.pid
        # survives; if its PID now belongs to another process PostgreSQL refuses
        # to start. A PID that is not *our* postmaster is stale: remove the file.
        pid_file = self.pgdata / "postmaster.pid"
        if pid_file.exists() and self.running_pid() is None:
            pid_file.unlink()

    def start(self) -> bool:
        """Start the cluster; return False if it was already running (reused)."""
        self.initialize()
        if self.running_pid() is not None:
            return False
        self._recover_stale_pid_file()
        user = _system_user()
        sock = self.socket_dir
        if sock != self.pgdata:
            sock.mkdir(parents=True, exist_ok=True)
            sock.chmod(0o777)
        if user is not None:
            entry = pwd.getpwnam(user)
            self.log_file.touch()
            os.chown(self.log_file, entry.pw_uid, entry.pw_gid)
        _run(
            "pg_ctl",
            ["-D", str(self.pgdata), "-l", str(self.log_file), "-w", "-t", "60", "start"],
            user=user,
            timeout=90,
        )
        return True

    def stop(self) -> None:
        if self.running_pid() is None:
            self._recover_stale_pid_file()
            return
        _run(
            "pg_ctl",
            ["-D", str(self.pgdata), "-m", "fast", "-w", "-t", "60", "stop"],
            user=_system_user(),
            timeout=90,
        )

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass(frozen=True)
class StackInfo:
    """What ``tenantctl up`` publishes in ``<state_dir>/stack.json`` for other commands."""

    pid: int
    api_url: str
    admin_url: str
    catalog_url: str
    pool_url: str
    silo_server_url: str
    app_catalog_url: str
    app_pool_url: str
    app_silo_server_url: str
    pool_admin_url: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, state_dir: Path) -> StackInfo | None:
        path = state_dir / "stack.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        info = cls(**data)
        if not psutil.pid_exists(info.pid):
            return None
        return info

    def write(self, state_dir: Path) -> None:
        path = state_dir / "stack.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)


class EmbeddedStack:
    """The two embedded clusters of one state directory."""

    def __init__(self, state_dir: Path, *, fast: bool = False) -> None:
        self.state_dir = state_dir.expanduser().resolve()
        self.main = EmbeddedCluster(self.state_dir / "pg" / "main", fast=fast)
        self.silos = EmbeddedCluster(self.state_dir / "pg" / "silos", fast=fast)

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for cluster in (self.main, self.silos):
            cluster.start()

    def stop(self) -> None:
        for cluster in (self.silos, self.main):
            cluster.stop()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.state_dir / "pg", ignore_errors=True)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[IO[str]]:
        """Hold the state directory's ``up`` lock; refuse if another process holds it."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.state_dir / "up.lock"
        handle = lock_path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StackAlreadyRunningError(
                f"a tenantctl stack is already running from {self.state_dir} (pid {holder}); "
                "use `tenantctl status` to see it, or pass --state-dir to start another"
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
