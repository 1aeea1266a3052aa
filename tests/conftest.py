"""Shared fixtures: the sidecar as a real process on loopback, the mock provider,
keys, and small helpers. Every test talks over real sockets to 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request

import pytest

from conduit_sidecar.keys import hash_key, new_key
from conduit_sidecar.mock import MockProvider
from conduit_sidecar.testing import Process, admin_ready, held_port

PROVIDER_SECRET = "sk-provider-secret-" + "x" * 16
def switching_protocols(request_head: bytes) -> bytes:
    """The 101 a hand-written upstream answers an upgrade request with."""
    from websockets.utils import accept_key
    key = next(line.split(b":", 1)[1].strip() for line in request_head.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:")).decode()
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n")


async def short_frame(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """A hand-written upstream reads one frame of under 126 bytes (a ping, a close):
    (its first byte, its mask bit, its payload unmasked)."""
    b0, b1 = await reader.readexactly(2)
    mask = await reader.readexactly(4) if b1 & 0x80 else bytes(4)
    payload = await reader.readexactly(b1 & 0x7F)
    return b0, b1 & 0x80, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class SlowUpstream:
    """A provider on 127.0.0.1 that answers each upgrade with its 101 only `delay`
    seconds after the request came (`asked` is set then), then holds the connection
    until the sidecar lets go (`released` is set then; `answered`: whether the 101 had
    gone out): a window in which the test changes something. A test that waits for
    the change to be seen sets `go` then: the 101 goes at once."""

    def __init__(self, port: int, delay: float = 1.0):
        self.port, self.delay = port, delay
        self.asked = asyncio.Event()
        self.go = asyncio.Event()  # set by the test: answer now, `delay` or not
        self.released = asyncio.Event()
        self.answered = False

    async def _answer(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.asked.set()
            let_go = asyncio.ensure_future(reader.read())  # ends when the sidecar lets go
            go = asyncio.ensure_future(self.go.wait())
            await asyncio.wait((let_go, go), timeout=self.delay, return_when=asyncio.FIRST_COMPLETED)
            go.cancel()
            if not let_go.done():
                writer.write(switching_protocols(head))
                self.answered = True
            await let_go
        except ConnectionError:
            pass
        self.released.set()
        writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc):
        self.server.close()


class HttpHead(asyncio.Protocol):
    """Collects an HTTP head for the in-process relay tests; the relay takes the
    transport over after it."""

    def __init__(self):
        self.data = b""
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data
        if b"\r\n\r\n" in self.data and not self.done.done():
            self.transport.pause_reading()
            self.done.set_result(self.data)

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(ConnectionError("lost"))


class UpgradeAnswer(asyncio.Protocol):
    """A hand-written upstream for the in-process relay tests: collects the upgrade
    request, then `answer`s it (by default with the 101) and ignores what follows."""

    def __init__(self):
        self.head = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.head is None:
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            head, self.head = self.head, None
            self.answer(head)

    def answer(self, head: bytes) -> None:
        self.transport.write(switching_protocols(head))


# For a hand-written upstream that tests make break the protocol at once, session
# after session (an early close each): no circuit rests it.
NO_CIRCUIT = "[circuit]\nfailures = 1000000\n"


def raw_upstream_sidecar(workdir: str, limits: str, providers: str = "") -> "SidecarProcess":
    """A sidecar whose provider `raw` is a hand-written upstream on `.upstream_port`
    (plus any other `providers` sections); its circuit never rests it (NO_CIRCUIT)."""
    port = held_port()
    proc = SidecarProcess(workdir, f'{providers}\n[providers.raw]\nurl = "ws://127.0.0.1:{port}/"\n',
                          standard_keys(), limits=limits, extra=NO_CIRCUIT).start()
    proc.upstream_port = port
    return proc


def run(coro, timeout: float = 60):
    """Run a test coroutine on uvloop, bounded in time."""
    import uvloop
    return uvloop.run(asyncio.wait_for(coro, timeout))


def socket_buffers(pid: int) -> list[dict[str, int]]:
    """The kernel's figures for each established TCP socket of a process (`ss -tm`'s
    skmem: r the receive queue, rb its bound, w the write queue, tb its bound, f the
    memory charged ahead), in bytes."""
    out = subprocess.run(["ss", "-tmpnH", "state", "established"], capture_output=True, text=True,
                         check=True).stdout
    found = []
    for entry in re.split(r"\n(?=\S)", out):      # an entry's skmem is on its next line
        if f"pid={pid}," in entry:
            skmem = re.search(r"skmem:\((.*?)\)", entry)
            assert skmem, entry
            fields = dict(re.fullmatch(r"([a-z]+)(\d+)", f).groups() for f in skmem[1].split(","))
            found.append({k: int(fields[k]) for k in ("r", "rb", "w", "tb", "f")})
    return found


def http_get(url: str, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Keys:
    """Named keys and their key-file entries."""

    def __init__(self):
        self.plain: dict[str, str] = {}
        self.entries: list[dict] = []

    def add(self, id: str, **fields) -> str:
        key = new_key()
        self.plain[id] = key
        self.entries.append({"id": id, "sha256": hash_key(key), **fields})
        return key

    def write(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"keys": self.entries}, f)
        os.replace(tmp, path)


class SidecarProcess(Process):
    """`conduit-sidecar serve` in its own process, stdout captured to a file."""

    def __init__(self, workdir: str, providers: str, keys: Keys, limits: str = "",
                 extra: str = "", env: dict | None = None, keys_file: str | None = None):
        self.workdir = workdir
        self.port = held_port()
        self.admin_port = held_port()
        self.keys = keys
        self.keys_file = keys_file or os.path.join(workdir, "keys.json")
        if keys_file is None:
            keys.write(self.keys_file)
        self.config = os.path.join(workdir, "config.toml")
        with open(self.config, "w") as f:
            f.write(textwrap.dedent(f"""\
                listen = "127.0.0.1:{self.port}"
                admin_listen = "127.0.0.1:{self.admin_port}"
                keys_file = "{self.keys_file}"
                keys_poll_seconds = 0.2
                {extra}
                [limits]
                {limits}
                """) + textwrap.dedent(providers))
        super().__init__("sidecar", [sys.executable, "-m", "conduit_sidecar", "serve", "--config",
                                     self.config, "--log-level", "debug"],
                         os.path.join(workdir, "sidecar.log"),
                         env={**os.environ, "PROVIDER_KEY": PROVIDER_SECRET, **(env or {})})

    def start(self) -> "SidecarProcess":
        # Under a second, mostly; on one core shared with busy processes the `started`
        # line came 9.6 s after the spawn (10 s was the bound). One that fails exits: seen at once.
        super().start(admin_ready(self.admin_port), timeout=30)
        return self

    def log_lines(self) -> list[dict]:
        # Whole lines only: a test that polls the log can read a line still being written.
        return [json.loads(line) for line in self.output().splitlines(keepends=True)
                if line.startswith("{") and line.endswith("\n")]

    def wait_lines(self, match, count: int = 1, timeout: float = 10) -> list[dict]:
        """The log's lines that `match`, once there are `count` of them: a line can
        wait up to 10 ms for its write (logs._WRITE_EVERY) after the event a test saw."""
        deadline = time.monotonic() + timeout
        while len(lines := [line for line in self.log_lines() if match(line)]) < count:
            assert time.monotonic() < deadline, f"{len(lines)} of {count} lines logged"
            time.sleep(0.01)
        return lines

    def url(self, model="mock-realtime", provider="mock", path="/v1/realtime/connect") -> str:
        query = "&".join(f"{k}={v}" for k, v in (("model", model), ("provider", provider)) if v)
        return f"ws://127.0.0.1:{self.port}{path}?{query}"

    def admin(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def auth(self, key_id: str = "good") -> dict:
        return {"Authorization": f"Bearer {self.keys.plain[key_id]}"}


def mock_section(port: int) -> str:
    """The config section of a provider `mock`: an OpenAI-shaped mock on `port`."""
    return (f'\n[providers.mock]\nurl = "ws://127.0.0.1:{port}/v1/realtime?model={{model}}"\n'
            'headers = { Authorization = "Bearer {secret}" }\nsecret_env = "PROVIDER_KEY"\n'
            'models = ["mock-*"]\n')


class MockProcess:
    """The built-in mock provider in its own process."""

    def __init__(self):
        self.port = held_port()  # not taken by a connect before the child binds it
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"import asyncio, uvloop; from conduit_sidecar.mock import main; "
                                   f"uvloop.run(main('127.0.0.1', {self.port}))"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert b"mock provider on" in self.proc.stdout.readline()
        # The rest is read and dropped: it holds a traceback for each connection that
        # ends without a close, and a full pipe would block the mock in a write.
        threading.Thread(target=collections.deque, args=(self.proc.stdout, 0), daemon=True).start()

    def section(self) -> str:
        """The config section of a provider `mock` served by this process."""
        return mock_section(self.port)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class ThreadMock:
    """A mock provider on its own event loop in a thread, so tests can read what it
    received (`requests`) while SDK clients run on theirs."""

    def __init__(self, shape: str):
        self.mock = MockProvider(shape=shape)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self.thread.start()
        self.ready.wait(10)
        self.port = self.mock.port

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        async with self.mock:
            self.ready.set()
            await self.stopped.wait()

    def last_request(self):
        return self.mock.requests[-1]

    def stop(self):
        self.loop.call_soon_threadsafe(self.stopped.set)
        self.thread.join(10)


def standard_keys() -> Keys:
    keys = Keys()
    keys.add("good")
    keys.add("other")
    keys.add("limited", max_connections=1)
    keys.add("disabled", enabled=False)
    keys.add("expired", expires_at="2020-01-01T00:00:00Z")
    keys.add("restricted", allowed_models=["gpt-realtime*"], allowed_providers=["openai"])
    keys.add("models-only", allowed_models=["gpt-realtime*"])
    keys.add("one-model", allowed_models=["mock-realtime"])
    future = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).isoformat()
    keys.add("future", expires_at=future)
    return keys


@pytest.fixture(scope="session")
def mock_provider():
    mock = MockProcess()
    yield mock
    mock.stop()


@pytest.fixture(scope="session")
def upstream_ports():
    """Ports for upstreams that tests start themselves (named by provider)."""
    return {name: held_port() for name in ("raw", "refuse", "blackhole", "down", "closer")}


@pytest.fixture(scope="session")
def sidecar(mock_provider, upstream_ports):
    """One sidecar for the tests that do not restart or reconfigure it."""
    workdir = tempfile.mkdtemp(prefix="conduit-test-")
    p = upstream_ports
    providers = f"""
        {mock_provider.section()}

        [providers.raw]
        url = "ws://127.0.0.1:{p['raw']}/raw?model={{model}}"
        headers = {{ X-Api-Key = "{{secret}}" }}
        secret_env = "PROVIDER_KEY"

        [providers.refuse]
        url = "ws://127.0.0.1:{p['refuse']}/"

        [providers.blackhole]
        url = "ws://127.0.0.1:{p['blackhole']}/"

        [providers.down]
        url = "ws://127.0.0.1:{p['down']}/"

        [providers.closer]
        url = "ws://127.0.0.1:{p['closer']}/"
        """
    proc = SidecarProcess(workdir, providers, standard_keys(),
                          limits="upstream_connect_timeout_seconds = 3\n"
                                 "max_message_bytes = 16777216\n").start()
    yield proc
    proc.stop()


def self_signed_tls(port: int, ca_out, state_dir) -> str:
    """The [tls] section of a loopback wss listener on `port` with its own CA."""
    return f'[tls]\nlisten = "127.0.0.1:{port}"\nself_signed = true\nca_out = "{ca_out}"\nstate_dir = "{state_dir}"\n'
