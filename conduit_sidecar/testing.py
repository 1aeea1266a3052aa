"""Support shared by the tests, the benchmarks and the scripts (soak, Autobahn): held
loopback ports, child processes with a log file, waiting for a sidecar's /readyz, and
throwaway certificate authorities made by the sidecar's own x509 builder.

Only they import it; `serve` never does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

from .tls import certificate, new_key, pem, server_context

__all__ = [
    "CA",
    "Certs",
    "Process",
    "admin_ready",
    "held_port",
    "port_open",
    "sidecar_command",
    "throwaway_certs",
]


_HELD: list[socket.socket] = []


def held_port() -> int:
    """A loopback port for a server started later, or again and again: held by a bound
    socket that never listens (SO_REUSEADDR) for the life of this process, so no
    outgoing connection takes it as its local port in between (a port merely found
    free and let go could be, and the server's bind then fails), while the servers
    (asyncio, uvloop, nginx, redis and Node set SO_REUSEADDR) bind it. While none
    listens, a connect to it is refused: a dead address too."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def admin_ready(admin_port: int) -> Callable[[], bool]:
    """A readiness check: the sidecar's `GET /readyz` answers 200."""

    def ready() -> bool:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as r:
                return r.status == 200
        return False

    return ready


def sidecar_command() -> list[str]:
    """`conduit-sidecar` beside this interpreter, else `python -m conduit_sidecar`."""
    exe = os.path.join(os.path.dirname(sys.executable), "conduit-sidecar")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "conduit_sidecar"]


class Process:
    """A child process whose output (stdout and stderr) goes to `log_path`."""

    def __init__(
        self, name: str, argv: list[str], log_path: str, *, env: dict | None = None, cwd: str | None = None
    ):
        self.name, self.argv, self.log_path = name, argv, log_path
        self.env, self.cwd = env, cwd
        self.proc: subprocess.Popen | None = None

    def start(self, ready: Callable[[], bool] | None = None, timeout: float = 15) -> Process:
        """Start it; with `ready`, wait until it says so. RuntimeError (with the end of
        the log) if the process exits or is not ready in time."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
            )
        deadline = time.monotonic() + timeout
        while ready is not None and not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")
            time.sleep(0.02)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The process and its children (nginx's worker)."""
        pids = [self.pid]
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == self.pid:
                        pids.append(int(pid))
        return pids

    def check(self, grace: float = 0) -> None:
        """Raise if the process has exited (within `grace` seconds): its exit code and
        the end of its log."""
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}")

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.output()[-chars:]
        return ""

    def wait(self, timeout: float) -> int:
        """Its exit code; stopped and RuntimeError if it runs longer than `timeout`."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"{self.name} did not finish in {timeout:.0f}s; see {self.log_path}") from None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class CA:
    """A throwaway certificate authority (30 days) that issues leaves into a directory."""

    def __init__(self, name: str = "conduit test CA"):
        self.key = new_key()
        self.cert = certificate(self.key, name=name, days=30, ca=True)

    def pem(self) -> bytes:
        return pem(self.cert)

    def write(self, path: str | os.PathLike) -> str:
        with open(path, "wb") as f:
            f.write(self.pem())
        return str(path)

    def issue(
        self,
        directory: str | os.PathLike,
        names: tuple[str, ...] = ("127.0.0.1", "localhost"),
        stem: str = "server",
    ) -> tuple[str, str]:
        """A leaf for `names`; returns (cert_file, key_file) written in `directory`."""
        key = new_key()
        cert = certificate(key, name=names[0], names=names, days=30, issuer=(self.key, self.cert))
        cert_file = os.path.join(directory, f"{stem}.crt")
        key_file = os.path.join(directory, f"{stem}.key")
        with open(cert_file, "wb") as f:
            f.write(pem(cert))
        with open(key_file, "wb") as f:
            f.write(pem(key))
        return cert_file, key_file

    def server_context(
        self, directory: str | os.PathLike, names: tuple[str, ...] = ("127.0.0.1", "localhost")
    ):
        ctx = server_context()
        ctx.load_cert_chain(*self.issue(directory, names))
        return ctx


@dataclasses.dataclass(frozen=True)
class Certs:
    """Files of a throwaway CA and of a leaf it signed."""

    ca: str
    cert: str
    key: str


def throwaway_certs(
    workdir: str, names: tuple[str, ...] = ("127.0.0.1", "localhost"), name: str = "conduit test CA"
) -> Certs:
    """A new CA and a leaf for `names`, written into `workdir`."""
    ca = CA(name)
    cert, key = ca.issue(workdir, names, "leaf")
    return Certs(ca.write(os.path.join(workdir, "ca.pem")), cert, key)
