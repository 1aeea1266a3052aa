"""The JSON lines on stdout: one write per loop turn (past a burst, one per
_WRITE_EVERY), and the session-end fast path gives the line the logger would, and
yields to any other handler or filter."""

import asyncio
import fcntl
import io
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import termios
import textwrap
import threading
import time
import types

import pytest

from conduit_sidecar import logs
from conftest import SidecarProcess, standard_keys


class Counted(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s):
        self.writes += 1
        return super().write(s)


@pytest.fixture
def stream(monkeypatch):
    out = Counted()
    monkeypatch.setattr("sys.stdout", out)
    root = logging.getLogger("conduit")
    saved = root.handlers[:], root.level, root.propagate, logging.root.handlers[:], logging.root.level
    monkeypatch.setattr("sys.unraisablehook", sys.unraisablehook)  # setup() sets it: put back
    logs.setup("info")
    yield out
    root.handlers[:], root.level, root.propagate, logging.root.handlers[:], logging.root.level = saved
    logging.captureWarnings(False)


def _lines(out: Counted) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_lines_of_one_loop_turn_go_out_in_one_write_when_it_ends(stream):
    log = logging.getLogger("conduit.test")

    async def body():
        for i in range(3):
            log.info("hello", extra={"n": i})
        logs.info(log, "fast", {"n": 3})
        assert stream.getvalue() == ""  # not before the turn ends
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(body())
    assert [(line["msg"], line["n"]) for line in _lines(stream)] == [
        ("hello", 0), ("hello", 1), ("hello", 2), ("fast", 3)
    ]
    assert stream.writes == 1


def test_past_a_burst_of_writes_they_come_one_per_write_every(stream, monkeypatch):
    """A write per loop turn cost 4% of a session's CPU when sessions ended a turn
    each (docs/benchmarks.md, "Where a session's CPU goes"). A burst of writes goes at
    once, each at the end of its turn; past it, a line waits for the next write's turn
    and the lines of the turns meanwhile go out with it, in order, in one write."""
    monkeypatch.setattr(logs, "_WRITE_EVERY", 0.5)
    monkeypatch.setattr(logs, "_WRITES_AHEAD", 2)
    log = logging.getLogger("conduit.test")

    async def body():
        loop = asyncio.get_running_loop()
        for i in range(2):  # the burst: _WRITES_AHEAD writes
            logs.info(log, "burst", {"n": i})
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert stream.writes == i + 1  # at the end of its turn
        written = loop.time()
        for i in range(2, 7):  # five more turns, a line each
            logs.info(log, "later", {"n": i})
            await asyncio.sleep(0)
        assert stream.writes == 2  # held
        while stream.writes == 2:
            await asyncio.sleep(0.01)
        return loop.time() - written

    waited = asyncio.run(body())
    assert 0.45 <= waited and stream.writes == 3
    assert [line["n"] for line in _lines(stream)] == list(range(7))


def test_outside_a_loop_each_line_is_written_at_once(stream):
    logging.getLogger("conduit.test").warning("now", extra={"event": "x"})
    assert _lines(stream)[0]["level"] == "warning" and _lines(stream)[0]["event"] == "x"


def test_the_fast_path_line_is_the_loggers(stream):
    log = logging.getLogger("conduit.test")
    fields = {"event": "session_end", "session_id": "s1", "close_code": 1000, "usage_tokens": {"input": 3}}
    log.info("session ended", extra=fields)
    logs.info(log, "session ended", fields)
    slow, fast = _lines(stream)
    assert slow.pop("ts")[:4] == fast.pop("ts")[:4]
    assert list(slow.items()) == list(fast.items())


def test_the_fast_path_yields_to_other_handlers_filters_and_levels(stream):
    log = logging.getLogger("conduit.test")
    seen = []
    extra = logging.Handler()
    extra.emit = seen.append  # type: ignore[method-assign]
    log.addHandler(extra)
    try:
        logs.info(log, "to both", {"event": "a"})
    finally:
        log.removeHandler(extra)
    assert [r.event for r in seen] == ["a"] and _lines(stream)[0]["event"] == "a"

    handler = logging.getLogger("conduit").handlers[0]
    dropped = logging.Filter("elsewhere")  # passes no record of conduit.test
    handler.addFilter(dropped)
    try:
        logs.info(log, "filtered", {"event": "b"})
    finally:
        handler.removeFilter(dropped)
    logging.getLogger("conduit").setLevel("WARNING")
    logs.info(log, "below the level", {"event": "c"})
    assert [line["event"] for line in _lines(stream)] == ["a"]


def test_a_failed_write_loses_the_lines_and_raises_nothing(stream, capsys):
    def broken(_):
        raise BrokenPipeError(32, "Broken pipe")

    stream.write = broken  # type: ignore[method-assign]
    log = logging.getLogger("conduit.test")

    async def body():
        logs.info(log, "lost", {"event": "a"})
        log.info("lost too")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return logging.getLogger("conduit").handlers[0].lines

    assert asyncio.run(body()) == []  # nothing kept to grow without bound
    assert "Broken pipe" in capsys.readouterr().err


def _on_pipe(tmp_path, mock_provider, pipe_size: int) -> tuple[SidecarProcess, int]:
    """A sidecar whose stdout is a non-blocking pipe of `pipe_size` bytes (as a parent
    that set O_NONBLOCK on the pipe it shares leaves it), stderr to `stderr`; returns
    it and the pipe's read end."""
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, pipe_size)
    os.set_blocking(write, False)
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), standard_keys())
    with open(tmp_path / "stderr", "wb") as stderr:
        sidecar.proc = subprocess.Popen(sidecar.argv, stdout=write, stderr=stderr, env=sidecar.env)
    os.close(write)
    return sidecar, read


def _refused_requests(port: int, n: int) -> list[socket.socket]:
    """`n` requests the sidecar refuses, sent and not waited for: a path it does not
    serve (404), one without an upgrade (426), and garbage (400), in turn (refusal
    lines are limited for each status, see the flood's test)."""
    requests = (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /v1/realtime/connect HTTP/1.1\r\nHost: x\r\n\r\n", b"XXXX\r\n\r\n")
    socks = []
    for i in range(n):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(requests[i % len(requests)])
        socks.append(sock)
    return socks


def test_a_full_non_blocking_stdout_loses_no_line(tmp_path, mock_provider):
    """With stdout a non-blocking pipe, a write that found the pipe full was lost
    without a word (Python's text stream drops what EAGAIN refused): the lines logged
    while the reader was behind were gone. The sidecar now waits for the pipe, as it
    does for a blocking one: every line arrives, whole and in order."""
    sidecar, read = _on_pipe(tmp_path, mock_provider, 4096)
    out = [b""]
    while b'"event":"start"' not in out[0]:  # read until it is up, then stop reading
        out[0] += os.read(read, 65536)
    socks = _refused_requests(sidecar.port, 300)
    # Not read until the pipe holds lines and stops taking more: full for the sidecar's
    # next write (a turn's lines), which waits for room, or (before) was lost.
    held = -1
    while held != (held := int.from_bytes(fcntl.ioctl(read, termios.FIONREAD, bytes(4)), "little")) or not held:
        time.sleep(0.5)

    def reader():
        while chunk := os.read(read, 65536):
            out[0] += chunk

    reading = threading.Thread(target=reader)
    reading.start()
    for sock in socks:
        with sock:
            assert sock.recv(100).startswith(b"HTTP/1.1 4")
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.proc.wait(10) == 0
    reading.join()
    os.close(read)
    lines = [json.loads(line) for line in out[0].decode().splitlines()]
    logged = sum(line.get("event") == "refused" for line in lines)
    assert logged + sum(line["lines"] for line in lines if line.get("event") == "not_logged") == 300
    assert lines[-1]["event"] == "stop"


def test_a_stdout_nobody_reads_is_reported_once(tmp_path, mock_provider):
    """Once stdout's reader is gone, each loop turn's write failed and each failure
    printed a 20-line traceback to stderr (134 µs of the event loop each): a refused
    connection a turn cost a kilobyte of stderr. One report now, until a write works."""
    sidecar, read = _on_pipe(tmp_path, mock_provider, 65536)
    out = b""
    while b'"event":"start"' not in out:
        out += os.read(read, 65536)
    os.close(read)
    for sock in _refused_requests(sidecar.port, 20):
        with sock:
            assert sock.recv(100).startswith(b"HTTP/1.1 4")
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.proc.wait(10) == 0
    assert (tmp_path / "stderr").read_text().count("Traceback") == 1


def test_a_closed_stdout_logs_to_stderr_and_the_sidecar_exits_cleanly(tmp_path, mock_provider):
    """Started with stdout closed (`>&-`), the sidecar's next file took descriptor 1:
    uvloop's epoll, and libuv aborts (SIGABRT, exit 134) when it closes a descriptor
    below 3, at every exit. Descriptors 0-2 are now held open (on /dev/null) first;
    the lines go to stderr, as Python's logging does with no stdout."""
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), standard_keys())
    command = " ".join(map(shlex.quote, sidecar.argv)) + " >&-"
    with open(tmp_path / "stderr", "wb") as stderr:
        sidecar.proc = subprocess.Popen(["sh", "-c", "exec " + command], stderr=stderr, env=sidecar.env)
    deadline = time.monotonic() + 10
    while b'"event":"start"' not in (tmp_path / "stderr").read_bytes():
        assert sidecar.proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()
        time.sleep(0.02)
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.proc.wait(10) == 0, (tmp_path / "stderr").read_text()
    lines = [json.loads(line) for line in (tmp_path / "stderr").read_text().splitlines()]
    assert lines[-1]["event"] == "stop"


def test_pythons_own_warnings_and_ignored_exceptions_are_json_lines():
    """Python prints a warning, and an exception raised where it can only be ignored
    (a `__del__`, a finalizer), as plain text on stderr: not a JSON line, and the
    latter with the object's repr and the exception's message."""
    code = textwrap.dedent('''
        import warnings
        from conduit_sidecar import logs
        logs.setup("info")
        warnings.warn("an old call", DeprecationWarning)
        class Leg:
            def __del__(self):
                raise ValueError("condt_" + "SECRET")  # (3.13 quotes -c source in tracebacks)
        leg = Leg()
        del leg
    ''')
    r = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("py.warnings", "warning"), ("conduit.unraisable", "error")]
    assert "DeprecationWarning: an old call" in lines[0]["msg"]
    assert "builtins.ValueError (message not logged)" in lines[1]["error"]
    assert "condt_SECRET" not in r.stdout


def _refusal_lines(sidecar, status: int, n: int) -> tuple[list[dict], list[dict]]:
    """The `refused` lines of `status`, and the `not_logged` lines that count the
    rest, once they account for `n` refusals (or 5 s have gone by)."""
    deadline = time.monotonic() + 5
    while True:
        lines = sidecar.log_lines()
        logged = [line for line in lines if line.get("event") == "refused" and line["status"] == status]
        told = [line for line in lines if line.get("event") == "not_logged" and line.get("status") == status]
        if len(logged) + sum(line["lines"] for line in told) >= n or time.monotonic() > deadline:
            return logged, told


def test_a_flood_of_refusals_is_logged_a_few_lines_a_second_each_kind(tmp_path, mock_provider):
    """Each refused connection (the parser's 400, decide's 404, the 503) logged a line,
    before any key is checked: a local script's 30,000 refusals a second wrote 5.5 MB
    of log a second, without bound, and a log reader that fell behind stalled the
    sidecar. Now 10 lines a second of each kind, then one line that says how many more
    there were; the first refusal of another kind is still logged during the flood."""
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), standard_keys(),
                             limits="max_connections = 8").start()
    seconds = {}  # each flood's length: 10 lines and one `not_logged` line per second begun
    try:
        for status, request in ((404, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"), (400, b"XXXX\r\n\r\n")):
            started = time.monotonic()
            for _ in range(300):
                with socket.create_connection(("127.0.0.1", sidecar.port), timeout=5) as sock:
                    sock.sendall(request)
                    assert sock.recv(100).startswith(b"HTTP/1.1 4")
            seconds[status] = time.monotonic() - started
        time.sleep(1.5)  # the lingering closes of the last refusals are over
        partials = [socket.create_connection(("127.0.0.1", sidecar.port)) for _ in range(8)]
        for partial in partials:
            partial.sendall(b"GET /v1/realtime/connect HTTP/1.1\r\n")  # the 8 slots
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", sidecar.port), timeout=5) as sock:
            assert sock.recv(100).startswith(b"HTTP/1.1 503")
        for partial in partials:
            partial.close()
        for status in (404, 400):
            logged, told = _refusal_lines(sidecar, status, 300)
            assert len(logged) + sum(line["lines"] for line in told) == 300  # each one counted
            # 10 lines and one `not_logged` a second, for as long as a loaded machine's flood
            # lasted (one of 12.7 s logged 140: a fixed 100 failed it); `told`: not all 300.
            bound = 11 * (int(seconds[status]) + 2)
            assert told and len(logged) + len(told) <= bound
            assert len(logged) >= 10  # the 400s' first: the 404s' flood took none of theirs
            assert all(line["of"] == "refused" for line in told)
        assert len(_refusal_lines(sidecar, 503, 1)[0]) == 1
    finally:
        sidecar.stop()


def test_a_flood_of_unknown_keys_is_logged_a_few_lines_a_second(tmp_path, mock_provider):
    """A well-formed upgrade with a key the sidecar does not know gets its 101 and 4001,
    and logged a `rejected` line each: a peer without a key wrote 168 bytes of log per
    try, 7,000 tries a second from one local script. Now, as for the refusals, 10 lines
    a second and a `not_logged` line with the rest; a key holder's rejection is its
    key's (key_id in the line), and is still logged every time."""
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), standard_keys()).start()
    head = (b"GET /v1/realtime/connect?model=mock-realtime&provider=mock HTTP/1.1\r\nHost: x\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer %s\r\n\r\n")
    try:
        started = time.monotonic()
        for _ in range(300):
            with socket.create_connection(("127.0.0.1", sidecar.port), timeout=5) as sock:
                sock.sendall(head % b"condt_unknown")
                assert sock.recv(100).startswith(b"HTTP/1.1 101")
        seconds = time.monotonic() - started  # 10 lines and one `not_logged` per second begun
        for _ in range(12):  # a known key, a model it may not use: 4003, with its key's id
            with socket.create_connection(("127.0.0.1", sidecar.port), timeout=5) as sock:
                sock.sendall((head % sidecar.keys.plain["one-model"].encode()).replace(b"mock-realtime", b"mock-x", 1))
                assert sock.recv(100).startswith(b"HTTP/1.1 101")
        deadline = time.monotonic() + 5
        while True:
            lines = sidecar.log_lines()
            logged = [line for line in lines if line.get("event") == "rejected" and line["code"] == 4001]
            told = [line for line in lines if line.get("event") == "not_logged" and line.get("code") == 4001]
            keyed = [line for line in lines if line.get("event") == "rejected" and line["key_id"] == "one-model"]
            if len(logged) + sum(line["lines"] for line in told) >= 300 and len(keyed) >= 12:
                break
            assert time.monotonic() < deadline, (len(logged), told, len(keyed))
            time.sleep(0.05)
        assert len(logged) + sum(line["lines"] for line in told) == 300
        assert told and len(logged) + len(told) <= 11 * (int(seconds) + 2)  # per second, as above
        assert len(keyed) == 12
    finally:
        sidecar.stop()


@pytest.mark.parametrize("attempt", ["disabled key", "expired key", "signed-url call"])
def test_a_flood_with_a_key_not_accepted_is_logged_a_few_lines_a_second(tmp_path, mock_provider, attempt):
    """The same limit for a key the file holds but does not accept (disabled, expired:
    what the holder of a leaked, switched-off key has), whose `rejected` lines went out
    one per try, and for ElevenLabs' `get-signed-url` call, whose `signed_url` line did,
    a key or none (5,000 lines a second from one script)."""
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), standard_keys()).start()
    key = sidecar.keys.plain["disabled" if attempt != "expired key" else "expired"].encode()
    if attempt == "signed-url call":
        head = b"GET /v1/convai/conversation/get-signed-url?agent_id=a HTTP/1.1\r\nHost: x\r\nxi-api-key: %s\r\n\r\n"
        event, answer = "signed_url", b"HTTP/1.1 401"
    else:
        head = (b"GET /v1/realtime/connect?model=mock-realtime&provider=mock HTTP/1.1\r\nHost: x\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer %s\r\n\r\n")
        event, answer = "rejected", b"HTTP/1.1 101"
    try:
        started = time.monotonic()
        for _ in range(300):
            with socket.create_connection(("127.0.0.1", sidecar.port), timeout=5) as sock:
                sock.sendall(head % key)
                assert sock.recv(100).startswith(answer)
        seconds = time.monotonic() - started
        deadline = time.monotonic() + 5
        while True:
            lines = sidecar.log_lines()
            logged = [line for line in lines if line.get("event") == event]
            told = [line for line in lines if line.get("event") == "not_logged" and line.get("of") == event]
            if len(logged) + sum(line["lines"] for line in told) >= 300:
                break
            assert time.monotonic() < deadline, (len(logged), told)
            time.sleep(0.05)
        assert len(logged) + sum(line["lines"] for line in told) == 300
        assert told and len(logged) + len(told) <= 11 * (int(seconds) + 2)  # 10 a second, and the rest told
    finally:
        sidecar.stop()


def test_a_flood_of_one_refusal_hides_no_line_of_another(tmp_path, mock_provider):
    """Lines were limited per event and status: a flood of garbage (400 `bad request`)
    took the 10 lines a second of every 400, and a refusal for another reason in that
    second (400 `model given more than once`) was only a number in the `not_logged`
    line of the garbage. Each reason is its own kind now, told in `not_logged` too."""
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), standard_keys()).start()
    requests = [b"XXXX\r\n\r\n"] * 15 + [b"GET /v1/realtime/connect?model=a&model=b HTTP/1.1\r\nHost: x\r\n\r\n"] * 3
    try:
        for request in requests:
            with socket.create_connection(("127.0.0.1", sidecar.port), timeout=5) as sock:
                sock.sendall(request)
                assert sock.recv(100).startswith(b"HTTP/1.1 400")
        deadline = time.monotonic() + 5
        while True:
            lines = sidecar.log_lines()
            repeated = [l for l in lines if l.get("event") == "refused" and l["reason"] == "model given more than once"]
            told = [l for l in lines if l.get("event") == "not_logged"]
            if len(repeated) == 3 and told:
                break
            assert time.monotonic() < deadline, (len(repeated), told)
            time.sleep(0.05)
        assert all(line["reason"].startswith("bad request") for line in told)
    finally:
        sidecar.stop()


def test_the_kinds_a_limiter_holds_are_bounded(stream):
    """Reasons come from peers (OpenSSL's names their alerts): each new one held a
    second of its own for the process's life. At most 32 are held; past them a new
    reason's lines count under `other`, a flood of them limited as one kind."""
    limited = logs.Limited(logging.getLogger("conduit.test"), ("event", "status", "reason"))

    async def body():
        for i in range(1000):
            limited.info("failed", {"event": "tls_failed", "reason": f"R{i}"})
        held = len(limited.windows)
        limited.flush()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return held

    assert asyncio.run(body()) == 33
    lines = _lines(stream)
    assert len([line for line in lines if line["event"] == "tls_failed"]) == 32 + 10
    told = [line for line in lines if line["event"] == "not_logged"]
    assert [(line["of"], line["reason"], "status" in line) for line in told] == [("tls_failed", "other", False)]


def test_a_full_limiter_lets_go_of_seconds_over_with_nothing_to_tell(stream, monkeypatch):
    """Past 32 kinds, those whose second is over and that owe no `not_logged` line go,
    and a new kind is logged as itself; one still owing its line stays until told."""
    now = [0.0]
    clock = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if not n.startswith("_")})
    clock.monotonic = lambda: now[0]
    monkeypatch.setattr(logs, "time", clock)
    limited = logs.Limited(logging.getLogger("conduit.test"), ("event", "status", "reason"))

    async def body():
        for i in range(32):
            for _ in range(11 if i == 0 else 1):  # R0's 11th line is owed to a `not_logged`
                limited.info("failed", {"event": "tls_failed", "reason": f"R{i}"})
        now[0] = 1.5
        limited.info("failed", {"event": "tls_failed", "reason": "new"})
        held = sorted(kind[2] for kind in limited.windows)
        limited.flush()
        return held

    assert asyncio.run(body()) == ["R0", "new"]
    lines = _lines(stream)
    assert lines[-2]["reason"] == "new"
    assert (lines[-1]["event"], lines[-1]["reason"], lines[-1]["lines"]) == ("not_logged", "R0", 1)


def test_a_lines_timestamp_is_utc_to_the_millisecond():
    formatter = logs.JSONFormatter()
    for created in (1700000000.0, 1700000000.0005, 1700000000.0006, 1700000000.999, 1700000001.25,
                    1700000001.9999, 1.5):
        ts = json.loads(formatter.line(created, "info", "conduit.x", "m", {}))["ts"]
        whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(created)))
        assert ts == f"{whole}.{int((created - int(created)) * 1000):03d}Z"
    assert json.loads(formatter.line(1700000000.042, "info", "conduit.x", "m", {}))["ts"] == "2023-11-14T22:13:20.042Z"
