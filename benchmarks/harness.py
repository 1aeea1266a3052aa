"""The benchmark columns as processes on loopback: the upstream, `naive`, `nginx` and
`sidecar` (and `floor`), each in its own process with its files in one temp dir,
plus the throwaway CA and certificate for the TLS variants.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from conduit_sidecar.testing import Certs, Process, admin_ready, held_port, port_open, throwaway_certs

from . import nginx as nginx_conf
from .loadgen import Target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Unavailable(Exception):
    """A column that cannot run here; the message says why (the tests skip on it)."""


def _start(name: str, argv: list[str], workdir: str, ready,
           env: dict[str, str] | None = None, timeout: float = 15) -> Process:
    """A column's process, its log in `workdir`, run from the checkout (benchmarks.*);
    `env`: variables set on top of this process's environment."""
    return Process(name, argv, os.path.join(workdir, f"{name}.log"), cwd=ROOT,
                   env={**os.environ, **env} if env else None).start(ready, timeout)


def client_context(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certs.ca)


# -- columns -------------------------------------------------------------------------

def upstream(workdir: str, certs: Certs | None) -> tuple[Process, int]:
    port = held_port()
    tls = ["--cert", certs.cert, "--key", certs.key] if certs else []
    proc = _start("upstream-tls" if certs else "upstream",
                  [sys.executable, "-m", "benchmarks.upstream", str(port), *tls], workdir,
                  lambda: port_open(port))
    return proc, port


def naive(workdir: str, up_port: int, certs: Certs | None) -> tuple[Process, int]:
    port = held_port()
    url = f"{'wss' if certs else 'ws'}://127.0.0.1:{up_port}"
    ca = ["--ca-file", certs.ca] if certs else []
    proc = _start("naive-tls" if certs else "naive",
                  [sys.executable, "-m", "benchmarks.naive_relay", str(port), url, *ca], workdir,
                  lambda: port_open(port))
    return proc, port


def floor(workdir: str, up_port: int, under: tuple[str, ...] = ()) -> tuple[Process, int]:
    """`benchmarks.floor_relay` to a plain upstream (`under`: as for `sidecar`)."""
    port = held_port()
    proc = _start("floor", [*under, sys.executable, "-m", "benchmarks.floor_relay", str(port), str(up_port)],
                  workdir, lambda: port_open(port), timeout=120 if under else 15)
    return proc, port


def nginx(workdir: str, up_port: int, certs: Certs | None) -> tuple[Process, int]:
    binary, why = nginx_conf.find_or_install()
    if binary is None:
        raise Unavailable(why)
    port = held_port()
    workdir = os.path.join(workdir, "nginx-tls" if certs else "nginx")
    os.makedirs(os.path.join(workdir, "tmp"), exist_ok=True)
    nginx_conf.config(workdir, port, up_port, certs.ca if certs else None)
    proc = _start("nginx", nginx_conf.argv(binary, workdir), workdir, lambda: port_open(port))
    return proc, port


def sidecar_command() -> list[str]:
    """`conduit-sidecar`, if installed and runnable; Unavailable otherwise."""
    command = shutil.which("conduit-sidecar", path=os.path.dirname(sys.executable)) \
        or shutil.which("conduit-sidecar")
    if command is None:
        raise Unavailable("conduit-sidecar is not installed (pip install -e .)")
    done = subprocess.run([command, "--help"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise Unavailable(f"conduit-sidecar does not run: {done.stderr.strip()[-500:]}")
    return [command]


@dataclass
class Sidecar:
    process: Process
    port: int
    key: str
    tls_port: int | None        # the wss listener, when this build serves it
    provider: str = "bench"


def redis(workdir: str) -> tuple[Process, int]:
    """redis-server on a free loopback port, no persistence."""
    if shutil.which("redis-server") is None:
        raise Unavailable("redis-server is not installed (apt-get install redis-server)")
    port = held_port()
    return _start("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no"], workdir,
                  lambda: port_open(port)), port


def sidecar(workdir: str, up_port: int, certs: Certs | None,
            listener: Certs | None = None, redis_port: int | None = None,
            uvloop_tls: bool = False, under: tuple[str, ...] = (),
            up_host: str = "127.0.0.1", metered: bool = False) -> Sidecar:
    """`conduit-sidecar serve` with provider `bench` at the upstream; with `certs` the
    provider leg is wss (CA in `ca_file`), with `listener` it also listens with TLS.
    With `redis_port`, [state] is that Redis and the key has every policy that uses it
    (leases, a session rate and a budget, none of them reached). `uvloop_tls`: TLS legs
    on uvloop's SSL transport, not the relay's OpenSSL calls. `under`: a command
    `serve` runs under (valgrind), given a minute to start. `up_host`: how the
    provider URL names the upstream (a name is looked up through the sidecar's cache).
    `metered`: the provider is `openai` (its URL the upstream's), so the relay scans
    the upstream's messages for OpenAI's usage events and meters them. Lines in
    $CONDUIT_BENCH_LIMITS are added to its [limits] (e.g. "socket_buffer_bytes = 32768")."""
    command = sidecar_command()
    name = ("sidecar" + ("-tls" if certs else "") + ("-listener" if listener else "")
            + ("-redis" if redis_port else "") + ("-uvloop" if uvloop_tls else ""))
    workdir = os.path.join(workdir, name)
    os.makedirs(workdir, exist_ok=True)
    made = subprocess.run([*command, "keys", "new", "--id", "bench", "--max-connections", "5000"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    key = next(line.split(":", 1)[1].strip() for line in made if line.startswith("key:"))
    entry = json.loads(next(line for line in made if line.startswith("{")))
    state = ""
    if redis_port:
        entry.update(sessions_per_minute=10_000_000,
                     budgets=[{"metric": "tokens", "limit": 1e15, "window": "day"}])
        state = f'[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:{redis_port}/0"\n'
    keys_file = os.path.join(workdir, "keys.json")
    with open(keys_file, "w") as f:
        json.dump({"keys": [entry]}, f)
    port, admin, tls_port = held_port(), held_port(), held_port()
    scheme, ca = ("wss", f'ca_file = "{certs.ca}"\n') if certs else ("ws", "")
    provider, secret = ("openai", 'secret_env = "CONDUIT_BENCH_SECRET"\n') if metered else ("bench", "")
    tls = (f'[tls]\nlisten = "127.0.0.1:{tls_port}"\ncert_file = "{listener.cert}"\n'
           f'key_file = "{listener.key}"\n') if listener else ""
    config = os.path.join(workdir, "config.toml")
    with open(config, "w") as f:
        f.write(f'listen = "127.0.0.1:{port}"\nadmin_listen = "127.0.0.1:{admin}"\n'
                f'keys_file = "{keys_file}"\n\n'
                "[limits]\nmax_connections = 5000\nmax_message_bytes = 67108864\n"
                f"drain_seconds = 0\n{os.environ.get('CONDUIT_BENCH_LIMITS', '')}\n\n"
                f'[providers.{provider}]\nurl = "{scheme}://{up_host}:{up_port}/{{model}}"\n{ca}{secret}\n'
                f'{tls}{state}')
    proc = _start(name, [*under, *command, "serve", "--config", config], workdir, admin_ready(admin),
                  env={**({"CONDUIT_NATIVE_TLS": "0"} if uvloop_tls else {}),
                       **({"CONDUIT_BENCH_SECRET": "sk-bench"} if metered else {})} or None,
                  timeout=120 if under else 15)
    if listener and not port_open(tls_port):
        tls_port = None
    return Sidecar(proc, port, key, tls_port, provider)


def sidecar_target(name: str, s: Sidecar, tls: ssl.SSLContext | None = None) -> Target:
    return Target(name, s.tls_port if tls else s.port,
                  lambda model: f"/v1/realtime/connect?model={model}&provider={s.provider}",
                  headers={"Authorization": f"Bearer {s.key}"}, ssl=tls, process=s.process)


def bench_certs(workdir: str) -> Certs:
    """A throwaway CA (written into `workdir`) and its leaf for the upstream's wss."""
    return throwaway_certs(workdir, ("localhost", "127.0.0.1"), "conduit bench CA")


@contextmanager
def _fresh(prefix: str, tls: bool, column, with_redis: bool = False) -> Iterator[Target]:
    """A fresh benchmark upstream (wss with a throwaway CA when `tls`), a Redis when
    `with_redis`, and the column `column(workdir, up_port, certs, redis_port)` starts,
    as (process, target), in a temp dir; all stopped on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as workdir, ExitStack() as stops:
        certs = bench_certs(workdir) if tls else None
        up, up_port = upstream(workdir, certs)
        stops.callback(up.stop)
        redis_port = None
        if with_redis:
            store, redis_port = redis(workdir)
            stops.callback(store.stop)
        proc, target = column(workdir, up_port, certs, redis_port)
        stops.callback(proc.stop)
        yield target


def fresh_sidecar(prefix: str, under: tuple[str, ...] = (), tls: bool = False,
                  up_host: str = "127.0.0.1", listener: bool = False, metered: bool = False,
                  with_redis: bool = False):
    """A fresh upstream and sidecar (`under`, `up_host`, `metered`: as for `sidecar`;
    `tls`: the provider leg is wss, verified against a throwaway CA; `listener`: the
    client leg is wss, to the sidecar's [tls] listener; `with_redis`: [state] in a
    fresh Redis, as `sidecar`'s `redis_port`); yields the sidecar's target."""
    def start(workdir, up_port, certs, redis_port):
        listen = (certs or bench_certs(workdir)) if listener else None
        s = sidecar(workdir, up_port, certs, listen, redis_port, under=under, up_host=up_host,
                    metered=metered)
        if listener and s.tls_port is None:
            s.process.stop()
            raise Unavailable("this sidecar build does not serve [tls] listen")
        return s.process, sidecar_target("sidecar", s, client_context(listen) if listener else None)
    return _fresh(prefix, tls, start, with_redis)


def fresh_floor(prefix: str, under: tuple[str, ...] = ()):
    """A fresh upstream and `floor` relay (`under`: as for `sidecar`); yields its target."""
    def start(workdir, up_port, _certs, _redis_port):
        proc, port = floor(workdir, up_port, under)
        return proc, proxy_target("floor", proc, port)
    return _fresh(prefix, False, start)


def proxy_target(name: str, proc: Process, port: int) -> Target:
    return Target(name, port, lambda model: f"/{model}", process=proc)
