"""A throwaway PostgreSQL cluster for the tests: Debian's ``postgresql`` package, no mock.

``initdb`` into a temporary folder, ``pg_ctl start`` on a free loopback port (unix socket in
the same folder), one fresh database per test (``PostgresCluster.database()``), ``pg_ctl stop``
and the folder removed at the end. PostgreSQL refuses to run as root (CI runs as root), so the
binaries then run as the ``postgres`` user (``runuser``) in a folder that user owns.

Tests that need it take the ``postgres`` fixture (tests/conftest.py); without the package they
skip and say how to get it (``make test`` installs it, best effort).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

INSTALL_HINT = ("no PostgreSQL server binaries (initdb, pg_ctl): install Debian's package "
                "(apt-get install -y postgresql; `make test` does, best effort)")


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` with initdb and pg_ctl, or PG_BINDIR."""
    candidates = [os.environ["PG_BINDIR"]] if os.environ.get("PG_BINDIR") else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
        if Path(p).parent.name.isdigit() else 0, reverse=True)
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def unavailable_reason() -> str | None:
    """Why no cluster can be started here; None when one can."""
    if find_bindir() is None:
        return INSTALL_HINT
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and there is no runuser to run PostgreSQL as postgres"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install -e '.[postgres]'"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """One running cluster; ``url`` for its ``postgres`` database, ``database()`` for new ones."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        assert self.bindir is not None, INSTALL_HINT
        self.root = Path(tempfile.mkdtemp(prefix="clf-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.user = "postgres" if self.as_root else pwd.getpwuid(os.geteuid()).pw_name
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", self.user,
                  "--encoding=UTF8", "--locale=C", "--no-sync")
        self.options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                        "-c fsync=on -c max_connections=200 -c shared_buffers=64MB")
        self.resume()
        self.url = f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def pause(self) -> None:
        """Stop the server, as an outage or a restart does (``-m fast``: its connections are
        terminated); its data stays for ``resume``."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start the server (again) on the same port and data."""
        self._run("pg_ctl", "-D", str(self.data), "-o", self.options, "-l",
                  str(self.root / "server.log"), "-w", "-t", "60", "start")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if out.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed ({out.returncode}): {out.stderr[-2000:]}\n{tail}")

    def database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
