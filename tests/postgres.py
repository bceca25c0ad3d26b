"""A private PostgreSQL for the tests and the ledger benchmark: initdb in a temp dir, a free
port, run as an unprivileged user (PostgreSQL refuses root), killed and restarted at will."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

import asyncpg

USER = "aio"
PASSWORD = "pg-SECRET-password-4711"  # trust auth ignores it; tests check it never leaks


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found is None:
        candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
        found = candidates[-1] if candidates else None
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """`start()`, `kill()` (SIGKILL to every PostgreSQL process: a crash) and `start()` again."""

    def __init__(self) -> None:
        initdb, postgres = _tool("initdb"), _tool("postgres")
        if initdb is None or postgres is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.postgres = postgres
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="aio-pg-")
        self.data = os.path.join(self.dir, "data")
        # as root, run as the `postgres` account the Debian package creates
        self.user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root needs a 'postgres' user to run PostgreSQL "
                                   "as (apt-get install postgresql creates it)") from None
            os.chown(self.dir, account.pw_uid, account.pw_gid)
            self.user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        subprocess.run([initdb, "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, **self.user)
        self.process: subprocess.Popen[bytes] | None = None
        self._databases = 0

    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        auth = f"{USER}:{PASSWORD}" if password else USER
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # after a kill, the old processes may take a moment to release the data dir
            self.process = subprocess.Popen(
                [self.postgres, "-D", self.data, "-p", str(self.port), "-c",
                 "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c",
                 "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                **self.user)
            if self._ready(deadline):
                return
            self.process.wait()
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not start")
            time.sleep(0.2)

    def _ready(self, deadline: float) -> bool:
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                asyncio.run(self._ping())
                return True
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                time.sleep(0.1)
        return False

    async def _ping(self) -> None:
        conn = await asyncpg.connect(self.url(), timeout=2)
        await conn.close()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends at once (they share a process group)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL (with the password)."""
        self._databases += 1
        name = f"t{self._databases}_{os.getpid()}"

        async def create() -> None:
            conn = await asyncpg.connect(self.url(), timeout=10)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        return self.url(name)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
