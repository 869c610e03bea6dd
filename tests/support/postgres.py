"""A real PostgreSQL server for tests, from Debian's packages: ``initdb`` in a temporary folder
(as the ``postgres`` user when the tests run as root: the server refuses to run as root),
``pg_ctl start`` listening on 127.0.0.1 on a free port with its unix socket in the data folder,
and a fresh database per test (``CREATE DATABASE``: a copy of the empty ``template1``, ~0.1 s).
Stopped (``pg_ctl stop -m fast``) and removed at the end."""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

SERVER_USER = "postgres"  # Debian's package makes it; initdb and the server run as it


class PostgresUnavailable(Exception):
    """The server cannot be run here: the message says what is missing."""


def find_bin_dir() -> Path:
    """The folder of initdb and pg_ctl (Debian keeps them out of PATH, per version)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(Path(p).parent.parent.name))
    if not versions:
        raise PostgresUnavailable("PostgreSQL is not installed (apt-get install postgresql, "
                                  "or `make setup`)")
    return Path(versions[-1]).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One server of its own. ``url(db)`` is a ``postgresql://`` URL for the collector."""

    def __init__(self) -> None:
        self.bin_dir = find_bin_dir()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                self._user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PostgresUnavailable(f"no {SERVER_USER!r} user to run PostgreSQL as "
                                          "(apt-get install postgresql makes it)") from None
        self.role = SERVER_USER if self.as_root else pwd.getpwuid(os.geteuid()).pw_name
        self.base = Path(tempfile.mkdtemp(prefix="driftwarden-pg-"))
        self.data = self.base / "data"
        self.port = 0
        self._names = itertools.count(1)

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        result = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
            timeout=timeout, cwd=self.base, user=self._user.pw_uid if self.as_root else None,
            group=self._user.pw_gid if self.as_root else None, env={**os.environ, "LC_ALL": "C"})
        if result.returncode != 0:
            raise PostgresUnavailable(f"{args[0]} failed ({result.returncode}): "
                                      f"{result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> PostgresServer:
        if self.as_root:
            os.chown(self.base, self._user.pw_uid, self._user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.role,
                  "--no-locale", "-E", "UTF8", "--no-sync")
        self.port = _free_port()
        self.resume()
        return self

    def resume(self) -> None:
        """Start the server (again, after ``halt()``): the same data, port and socket."""
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        log_path = self.base / "server.log"
        try:
            self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(log_path), "-w",
                      "-t", "60", "start")
        except PostgresUnavailable as exc:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise PostgresUnavailable(f"{exc}\n{tail}") from None

    def halt(self) -> None:
        """Stop the server as an outage does (``pg_ctl stop -m fast``: every connection is
        cut), keeping its data for ``resume()``."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.halt()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.role}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(sql)

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new empty database for the block (its URL), dropped after it."""
        name = f"test_{next(self._names)}"
        self.execute(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


__all__ = ["PostgresServer", "PostgresUnavailable", "find_bin_dir", "running_postgres"]
