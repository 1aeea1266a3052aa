"""Operations: exact metrics, the session-end log line, secrets kept out of logs,
usage metering, the admin endpoints, drain and shutdown."""

import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from conftest import (PROVIDER_SECRET, SidecarProcess, SlowUpstream, held_port, http_get, run,
                      standard_keys)
from test_bad_input import session_ends

from conduit_sidecar.mock import MockProvider
from conduit_sidecar.testing import Process


def ended(sidecar, before: int) -> list[dict]:
    """The session_end lines past the first `before`, once there is one (its metrics
    are counted by then): a session's end is seen after its client is done."""
    return sidecar.wait_lines(lambda line: line.get("event") == "session_end", before + 1, timeout=5)[before:]


def scrape(sidecar) -> dict:
    status, text = http_get(sidecar.admin("/metrics"))
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def ops(mock_provider):
    """A sidecar of its own, so that its metrics and log hold only this module's traffic."""
    usage_port = held_port()
    workdir = tempfile.mkdtemp(prefix="conduit-ops-")
    providers = f"""
        {mock_provider.section()}

        [providers.fragmenting]
        url = "ws://127.0.0.1:{usage_port}/"
        """
    proc = SidecarProcess(workdir, providers, standard_keys()).start()
    proc.usage_port = usage_port
    try:
        yield proc
        # Checked once every test here has run, in whatever order: the whole log.
        output = proc.output()
        for secret in [*proc.keys.plain.values(), PROVIDER_SECRET, "Bearer", "condt_nope"]:
            assert secret not in output
        assert "authorization" not in output.lower()
    finally:
        proc.stop()


def client_frame_len(n):       # masked
    return 2 + 4 + n + (2 if n >= 126 else 0) + (6 if n >= 65536 else 0)


def server_frame_len(n):
    return 2 + n + (2 if n >= 126 else 0) + (6 if n >= 65536 else 0)


def test_frames_and_bytes_are_counted_exactly(ops):
    before, ends = scrape(ops), len(session_ends(ops))
    sizes = [0, 5, 125, 126, 1000, 70000]

    async def body():
        async with connect(ops.url(), additional_headers=ops.auth(), compression=None,
                           max_size=None) as ws:
            created = await ws.recv()
            for n in sizes:
                await ws.send(os.urandom(n))
                await ws.recv()
                await ws.send("x" * n)
                await ws.recv()
            await ws.close(1000)
        return len(created.encode())
    created = run(body())
    ended(ops, ends)
    after = scrape(ops)
    d = lambda name, **l: value(after, name, **l) - value(before, name, **l)  # noqa: E731
    up, down = "client_to_upstream", "upstream_to_client"
    assert d("conduit_frames_total", direction=up, kind="binary") == len(sizes)
    assert d("conduit_frames_total", direction=up, kind="text") == len(sizes)
    assert d("conduit_frames_total", direction=up, kind="close") == 1
    assert d("conduit_frames_total", direction=down, kind="binary") == len(sizes)
    assert d("conduit_frames_total", direction=down, kind="text") == len(sizes) + 1
    assert d("conduit_frames_total", direction=down, kind="close") == 1
    assert d("conduit_bytes_total", direction=up) == 2 * sum(map(client_frame_len, sizes)) + 8
    assert d("conduit_bytes_total", direction=down) == (
        2 * sum(map(server_frame_len, sizes)) + server_frame_len(created) + 4)
    assert d("conduit_payload_bytes_total", direction=down, kind="binary") == sum(sizes)
    assert d("conduit_audio_seconds_total", direction=up) == pytest.approx(sum(sizes) / 48000)
    assert d("conduit_closes_total", side="client", code="1000") == 1
    assert d("conduit_connections_total", result="accepted") == 1
    assert value(after, "conduit_connections_active") == 0
    assert d("conduit_relay_processing_seconds_count") > 0


def test_auth_failures_and_close_codes_are_counted(ops):
    before = scrape(ops)

    async def attempt(headers, url=None):
        try:
            async with connect(url or ops.url(), additional_headers=headers) as ws:
                await ws.recv()
        except ConnectionClosed:
            pass
    async def body():
        await attempt({})
        await attempt({"Authorization": "Bearer condt_nope"})
        await attempt({"Authorization": "Bearer condt_nope"})
        await attempt(ops.auth("expired"))
        await attempt(ops.auth(), ops.url(provider="nope"))
    run(body())
    after = scrape(ops)
    d = lambda name, **l: value(after, name, **l) - value(before, name, **l)  # noqa: E731
    assert d("conduit_auth_failures_total", reason="missing") == 1
    assert d("conduit_auth_failures_total", reason="unknown") == 2
    assert d("conduit_auth_failures_total", reason="expired") == 1
    assert d("conduit_closes_total", side="sidecar", code="4001") == 4
    assert d("conduit_closes_total", side="sidecar", code="4004") == 1
    assert d("conduit_connections_total", result="auth_failed") == 4


def test_client_close_codes_are_bounded_labels(ops):
    """A client picks its close code: each of the 2,000 of 3000-4999 was a series of
    conduit_closes_total of its own, kept for the life of the process."""
    codes = [3000, 3001, 3999, 4001, 4999]

    async def body():
        for code in codes:
            async with connect(ops.url(), additional_headers=ops.auth()) as ws:
                await ws.recv()
                await ws.close(code)
    before, ends = scrape(ops), len(session_ends(ops))
    run(body())
    ended(ops, ends + len(codes) - 1)  # all of them
    assert [end["close_code"] for end in session_ends(ops)[ends:]] == codes  # the log keeps them
    after = scrape(ops)
    d = lambda **l: value(after, "conduit_closes_total", **l) - value(before, "conduit_closes_total", **l)  # noqa: E731
    assert d(side="client", code="3xxx") == 3 and d(side="client", code="4xxx") == 2
    assert not [key for key in after if key[0] == "conduit_closes_total"
                and dict(key[1]) in [{"side": "client", "code": str(c)} for c in codes]]


def test_usage_counts_match_the_provider_usage_even_when_fragmented(ops):
    usages = [{"input_tokens": 11, "output_tokens": 22,
               "input_token_details": {"text_tokens": 1, "audio_tokens": 10, "cached_tokens": 0},
               "output_token_details": {"text_tokens": 2, "audio_tokens": 20}},
              {"input_tokens": 100, "output_tokens": 200,
               "input_token_details": {"text_tokens": 40, "audio_tokens": 60, "cached_tokens": 5},
               "output_token_details": {"text_tokens": 50, "audio_tokens": 150}}]

    async def provider(ws):
        # First response.done whole; the second split in three continuation frames
        # with a ping between them; a lookalike that is not response.done.
        await ws.send(json.dumps({"type": "response.done", "response": {"usage": usages[0]}}))
        second = json.dumps({"type": "response.done", "event_id": "e2",
                             "response": {"output": [{"pad": "x" * 3000}], "usage": usages[1]}})
        parts = [second[:7], second[7:2000], second[2000:]]
        await ws.send(iter(parts))
        await ws.send(json.dumps({"type": "response.output_text.delta", "delta": '"response.done"'}))
        await ws.send(b'"response.done" in a binary frame is audio, not an event')
        await ws.wait_closed()

    async def body():
        async with serve(provider, "127.0.0.1", ops.usage_port):
            async with connect(ops.url(provider="fragmenting"), additional_headers=ops.auth()) as ws:
                for _ in range(4):
                    await ws.recv()
    before, ends = scrape(ops), len(session_ends(ops))
    run(body())
    ended(ops, ends)
    after = scrape(ops)
    labels = dict(key_id="good", provider="fragmenting", model="mock-realtime")
    d = lambda kind: (value(after, "conduit_usage_tokens_total", kind=kind, **labels)  # noqa: E731
                      - value(before, "conduit_usage_tokens_total", kind=kind, **labels))
    assert d("input") == 111 and d("output") == 222
    assert d("input_audio") == 70 and d("input_text") == 41 and d("input_cached") == 5
    assert d("output_audio") == 170 and d("output_text") == 52
    end = [l for l in ops.log_lines() if l.get("event") == "session_end"
           and l.get("provider") == "fragmenting"][-1]
    assert end["usage_tokens"]["input"] == 111 and end["usage_tokens"]["output_audio"] == 170


def test_session_end_log_line(ops):
    async def body():
        async with connect(ops.url(), additional_headers=ops.auth()) as ws:
            await ws.recv()
            await ws.send(b"x" * 960)
            await ws.recv()
            await ws.close(1000, "done")
    ends = len(session_ends(ops))
    run(body())
    end = ended(ops, ends)[0]
    for field in ("session_id", "key_id", "model", "provider", "duration_seconds",
                  "frames_client_to_upstream", "frames_upstream_to_client",
                  "bytes_client_to_upstream", "bytes_upstream_to_client", "closed_by",
                  "close_code", "close_reason", "usage_tokens"):
        assert field in end, field
    assert end["key_id"] == "good" and end["model"] == "mock-realtime" and end["provider"] == "mock"
    assert end["closed_by"] == "client" and end["close_code"] == 1000 and end["close_reason"] == "done"
    assert end["frames_client_to_upstream"] == 2 and end["frames_upstream_to_client"] == 3
    start = [l for l in ops.log_lines() if l.get("event") == "start"][0]
    assert start["keys"] == len(ops.keys.entries) and "mock" in start["providers"] and start["version"]


def test_session_end_audio_seconds_are_in_the_format_its_query_names(tmp_path):
    """A Deepgram session whose query names its audio (8 kHz mu-law: 8,000 bytes a
    second): its session_end line counted the bytes at [audio]'s rate (24 kHz pcm16,
    48,000), a sixth of its seconds, where its budget counts them at its own."""
    port = held_port()
    sidecar = SidecarProcess(str(tmp_path), f'[providers.deepgram]\nurl = "ws://127.0.0.1:{port}/v1/listen?model={{model}}"\n'
                             'secret_env = "PROVIDER_KEY"\n', standard_keys()).start()
    try:
        async def body():
            url = f"ws://127.0.0.1:{sidecar.port}/v1/listen?model=nova-3&encoding=mulaw&sample_rate=8000"
            async with MockProvider(port=port, shape="deepgram"):
                async with connect(url, additional_headers={"Authorization": f"Token {sidecar.keys.plain['good']}"}) as ws:
                    await ws.send(bytes(16_000))                    # 2 s of 8 kHz mu-law
                    await ws.send(json.dumps({"type": "CloseStream"}))
                    with pytest.raises(ConnectionClosed):
                        while True:
                            await asyncio.wait_for(ws.recv(), 10)
        run(body())
        end = ended(sidecar, 0)[0]
    finally:
        sidecar.stop()
    assert end["audio_seconds_client_to_upstream"] == 2.0


def test_admin_endpoints(ops):
    assert http_get(ops.admin("/healthz")) == (200, "ok\n")
    assert http_get(ops.admin("/readyz")) == (200, "ready\n")
    assert http_get(ops.admin("/nope"))[0] == 404
    assert http_get(ops.admin("/drain"))[0] == 405          # GET on a POST endpoint
    assert http_get(ops.admin("/metrics"), method="POST")[0] == 405
    with socket.create_connection(("127.0.0.1", ops.admin_port)) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")


def test_metrics_exposition_round_trips(ops):
    text = http_get(ops.admin("/metrics"))[1]
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in ("conduit_connections_active", "conduit_connections_pending", "conduit_connections",
                 "conduit_connection_duration_seconds",
                 "conduit_frames", "conduit_bytes", "conduit_upstream_connect_seconds",
                 "conduit_auth_failures", "conduit_closes", "conduit_keys_reload",
                 "conduit_relay_processing_seconds", "conduit_build_info", "conduit_usage_tokens",
                 "conduit_audio_seconds"):
        assert name in names, name


def test_the_metrics_exposed_are_the_ones_documented(ops):
    """prometheus-client adds a `<name>_created` gauge to every counter and histogram,
    a series per label set holding when it was made: a dozen metrics docs/metrics.md
    did not name, doubling the series of the counters."""
    async def refused():  # a few labelled series exist (auth failures, closes, outcomes)
        with pytest.raises(ConnectionClosed):
            async with connect(ops.url()) as ws:
                await ws.recv()
    run(refused())
    text = http_get(ops.admin("/metrics"))[1]
    exposed = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "metrics.md")) as f:
        documented = {line.split("`")[1] for line in f if line.startswith("| `conduit_")}
    assert exposed == documented


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed "
                    "(scripts/test.sh installs Debian's prometheus package when it can)")
def test_promtool_accepts_the_metrics(ops):
    text = http_get(ops.admin("/metrics"))[1]
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result


def drain_sidecar(tmp_path, mock_provider, drain_seconds):
    providers = f"""
        {mock_provider.section()}
        """
    return SidecarProcess(str(tmp_path), providers, standard_keys(),
                          limits=f"drain_seconds = {drain_seconds}").start()


@pytest.mark.parametrize("trigger", ["drain", "sigterm"])
def test_drain_keeps_sessions_then_closes_with_1001(tmp_path, mock_provider, trigger):
    sidecar = drain_sidecar(tmp_path, mock_provider, 1.5)
    try:
        async def body():
            async with connect(sidecar.url(), additional_headers=sidecar.auth()) as ws:
                await ws.recv()
                drained = time.monotonic()
                if trigger == "drain":
                    assert http_get(sidecar.admin("/drain"), method="POST")[0] == 202
                    assert http_get(sidecar.admin("/drain"), method="POST")[0] == 202  # idempotent
                else:
                    sidecar.proc.send_signal(signal.SIGTERM)
                    deadline = time.monotonic() + 10       # the signal handled: polled, not a fixed 0.2 s
                    while http_get(sidecar.admin("/readyz"))[0] != 503:
                        assert time.monotonic() < deadline, "SIGTERM began no drain"
                        await asyncio.sleep(0.02)
                assert http_get(sidecar.admin("/readyz")) == (503, "draining\n")  # why, for the operator
                # New sessions are turned away with 1013 ...
                with pytest.raises(ConnectionClosed) as late_exc:
                    async with connect(sidecar.url(), additional_headers=sidecar.auth()) as late:
                        await late.recv()
                assert late_exc.value.rcvd.code == 1013
                # ... while the live one keeps flowing until drain_seconds (back to back:
                # spaced out, the echoes took 0.5 s of the 1.5 s a loaded machine needs).
                for _ in range(5):
                    await ws.send(b"audio" * 100)
                    assert await ws.recv() == b"audio" * 100
                with pytest.raises(ConnectionClosed) as exc:
                    while True:
                        await ws.recv()
                assert (exc.value.rcvd.code, exc.value.rcvd.reason) == (1001, "going away")
                assert time.monotonic() - drained >= 1.5 - 0.05  # not before drain_seconds
        run(body())
        assert sidecar.proc.wait(10) == 0
    finally:
        sidecar.stop()


def test_a_session_still_opening_when_the_drain_ends_gets_1001(tmp_path):
    """drain_seconds run out while a session waits for its provider's 101: the session
    gets 1001 once the provider answers, and the sidecar exits after it. It was
    dropped from the live sessions at once, so the sidecar exited under it (the client
    saw the connection end without a close code) or relayed it untracked."""
    upstream_port = held_port()
    sidecar = SidecarProcess(str(tmp_path), f'[providers.slow]\nurl = "ws://127.0.0.1:{upstream_port}/"\n',
                             standard_keys(), limits="drain_seconds = 0.3").start()
    try:
        async def body():
            async with SlowUpstream(upstream_port) as up:       # the drain ends meanwhile
                url = f"ws://127.0.0.1:{sidecar.port}/v1/realtime/connect?provider=slow"
                attempt = asyncio.ensure_future(connect(url, additional_headers=sidecar.auth()))
                await asyncio.wait_for(up.asked.wait(), 5)
                assert http_get(sidecar.admin("/drain"), method="POST")[0] == 202
                ws = await asyncio.wait_for(attempt, 10)
                with pytest.raises(ConnectionClosed) as exc:
                    await asyncio.wait_for(ws.recv(), 10)
                return exc.value.rcvd
        rcvd = run(body())
        assert rcvd is not None and (rcvd.code, rcvd.reason) == (1001, "going away")
        assert sidecar.proc.wait(10) == 0
    finally:
        sidecar.stop()


def test_a_session_held_for_its_first_message_when_the_drain_ends_gets_1001_at_once(tmp_path):
    """drain_seconds run out while a session's first message is held (Gemini's setup,
    after the 101): the session gets 1001 then. It waited out its handshake timeout,
    past the drain's close timeout, and was dropped by the sidecar's exit: the client
    saw the connection end without a close code. (A provider's greeting awaited:
    test_faults.py::test_a_session_greeted_after_the_drain_ended_is_closed_going_away.)"""
    upstream_port = held_port()
    sidecar = SidecarProcess(
        str(tmp_path),
        f'[providers.gemini]\nurl = "ws://127.0.0.1:{upstream_port}/"\nsecret_env = "PROVIDER_KEY"\n',
        standard_keys(), limits="drain_seconds = 0.3\nhandshake_timeout_seconds = 60\nclose_timeout_seconds = 2",
    ).start()
    try:
        async def body():
            async with SlowUpstream(upstream_port, delay=0):    # never asked
                url = f"ws://127.0.0.1:{sidecar.port}/v1/realtime/connect?provider=gemini&model=m"
                async with connect(url, additional_headers=sidecar.auth()) as ws:
                    assert http_get(sidecar.admin("/drain"), method="POST")[0] == 202
                    with pytest.raises(ConnectionClosed) as exc:
                        await asyncio.wait_for(ws.recv(), 20)
                    return exc.value.rcvd
        rcvd = run(body(), timeout=30)
        assert rcvd is not None and (rcvd.code, rcvd.reason) == (1001, "going away")
        assert sidecar.proc.wait(10) == 0
    finally:
        sidecar.stop()


def test_second_signal_exits_at_once(tmp_path, mock_provider):
    sidecar = drain_sidecar(tmp_path, mock_provider, 60)
    try:
        async def body():
            async with connect(sidecar.url(), additional_headers=sidecar.auth()) as ws:
                await ws.recv()
                sidecar.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                sidecar.proc.send_signal(signal.SIGINT)
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.recv()
        run(body(), timeout=15)
        assert sidecar.proc.wait(10) == 0
    finally:
        sidecar.stop()


def test_a_session_opening_at_a_second_signal_goes_away_and_is_not_client_gone(tmp_path):
    """A second signal while a session waits for its provider's 101: the process stops
    at once, cancelling the opening. It was counted and logged `client_gone`, though its
    client had not left; it is the drain's end's outcome: 1001 to the client (its 101
    first), a `rejected` line with 1001 and its key, `going_away`."""
    upstream_port = held_port()
    sidecar = SidecarProcess(str(tmp_path), f'[providers.slow]\nurl = "ws://127.0.0.1:{upstream_port}/"\n',
                             standard_keys(), limits="drain_seconds = 60").start()
    try:
        async def body():
            async with SlowUpstream(upstream_port, delay=60) as up:
                url = f"ws://127.0.0.1:{sidecar.port}/v1/realtime/connect?provider=slow"
                attempt = asyncio.ensure_future(connect(url, additional_headers=sidecar.auth()))
                await asyncio.wait_for(up.asked.wait(), 5)
                sidecar.proc.send_signal(signal.SIGTERM)
                while http_get(sidecar.admin("/readyz"))[0] != 503:  # the drain began
                    await asyncio.sleep(0.02)
                sidecar.proc.send_signal(signal.SIGTERM)
                ws = await asyncio.wait_for(attempt, 10)
                with pytest.raises(ConnectionClosed) as exc:
                    await asyncio.wait_for(ws.recv(), 10)
                return exc.value.rcvd
        rcvd = run(body())
        assert sidecar.proc.wait(10) == 0
    finally:
        sidecar.stop()
    assert rcvd is not None and (rcvd.code, rcvd.reason) == (1001, "going away")
    lines = sidecar.log_lines()
    assert not [line for line in lines if line.get("event") == "client_gone"]
    assert [(line["code"], line["key_id"]) for line in lines if line.get("event") == "rejected"] == [
        (1001, "good")]


def test_a_second_signal_does_not_wait_for_a_client_that_never_answers_the_close(tmp_path, mock_provider):
    """The second signal ends the process at once: not after the close timeout of a
    client that never answers its 1001 (here 60 s, as is drain_seconds)."""
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), standard_keys(),
                             limits="drain_seconds = 60\nclose_timeout_seconds = 60").start()
    try:
        with socket.create_connection(("127.0.0.1", sidecar.port)) as s:
            s.sendall(f"GET /v1/realtime/connect?model=mock-realtime&provider=mock HTTP/1.1\r\nHost: x\r\n"
                      f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                      f"Authorization: Bearer {sidecar.keys.plain['good']}\r\n\r\n".encode())
            assert s.recv(12) == b"HTTP/1.1 101"             # and then never a byte read
            sidecar.proc.send_signal(signal.SIGTERM)
            while http_get(sidecar.admin("/readyz"))[0] != 503:  # the drain began
                time.sleep(0.05)
            sidecar.proc.send_signal(signal.SIGINT)
            assert sidecar.proc.wait(10) == 0
    finally:
        sidecar.stop()


def pid_namespace_wrapper() -> list[str] | None:
    """`unshare` arguments that run a command as PID 1 of a new PID namespace, as a
    container's entrypoint runs (as root, or in a user namespace); None if neither
    works here."""
    if shutil.which("unshare") is None:
        return None
    for wrapper in (["unshare", "--pid", "--fork", "--kill-child"],
                    ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child"]):
        if subprocess.run([*wrapper, "true"], capture_output=True).returncode == 0:
            return wrapper
    return None


def test_a_sigterm_during_start_up_is_not_lost_as_pid_1(tmp_path):
    """The image's exec-form entrypoint makes the sidecar PID 1 of its container, and
    the kernel does not deliver to PID 1 a signal it has no handler for. A SIGTERM
    during start-up (the pod deleted as it starts, its sidecar restarting) was dropped:
    the sidecar ran on, and the kubelet waited out terminationGracePeriodSeconds to
    SIGKILL it. The config is a FIFO here, so that start-up stops at a known point
    (reading it) while the signal comes."""
    wrapper = pid_namespace_wrapper()
    if wrapper is None:
        pytest.skip("cannot make a PID namespace here (unshare)")
    sidecar = SidecarProcess(str(tmp_path), "", standard_keys())
    with open(sidecar.config) as f:
        config = f.read()
    os.remove(sidecar.config)
    os.mkfifo(sidecar.config)
    sidecar.argv = [*wrapper, *sidecar.argv]
    Process.start(sidecar)                   # not ready until the config comes
    try:
        fifo = os.open(sidecar.config, os.O_WRONLY)   # returns once the sidecar opened it
        deadline = time.monotonic() + 10
        while not (children := open(f"/proc/{sidecar.pid}/task/{sidecar.pid}/children").read().split()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (pid,) = children
        with open(f"/proc/{pid}/status") as f:
            assert next(line for line in f if line.startswith("NSpid:")).split()[-1] == "1"
        os.kill(int(pid), signal.SIGTERM)    # from outside, as the container runtime does
        os.write(fifo, config.encode())
        os.close(fifo)
        assert sidecar.proc.wait(10) == 0, sidecar.tail()
        assert [line["event"] for line in sidecar.log_lines()] == ["start", "drain", "stop"]
    finally:
        sidecar.stop()


def test_sessions_up_to_max_connections_do_not_run_out_of_file_descriptors(tmp_path, mock_provider):
    """Each session holds two sockets. Container runtimes give a process a soft
    open-file limit that may be 1024 (containerd 2.0: 1024 soft, 524288 hard), which
    ran out at about 500 sessions of the default max_connections 1000: 1014 `upstream
    unreachable: Too many open files`, and the circuit breaker then rested the
    provider for everyone. The sidecar raises its soft limit to the hard one. Here
    the soft limit is 64 and max_connections 40."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 256:
        pytest.skip(f"the hard open-file limit here is {hard}")
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), standard_keys(),
                             limits="max_connections = 40")
    limited = (f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, {hard})); "
               "os.execv(sys.argv[1], sys.argv[1:])")
    sidecar.argv = [sys.executable, "-c", limited, *sidecar.argv]
    sidecar.start()
    try:
        async def body():
            sessions = []
            try:
                for _ in range(40):
                    ws = await connect(sidecar.url(), additional_headers=sidecar.auth())
                    sessions.append(ws)
                    await ws.recv()
                assert http_get(sidecar.admin("/healthz"))[0] == 200
            finally:
                for ws in sessions:
                    await ws.close()
        run(body())
    finally:
        sidecar.stop()


def test_a_sidecar_out_of_file_descriptors_does_not_rest_the_provider(tmp_path, mock_provider):
    """With no descriptor left for the provider's socket (a hard limit it cannot raise),
    each failed connect counted in the deployment's circuit: five of them rested a
    healthy provider, and every session of every app after them got 1014 `resting`
    until the cooldown ended, though descriptors were free again at once."""
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), standard_keys(),
                             limits="max_connections = 200")
    limited = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48)); "
               "os.execv(sys.argv[1], sys.argv[1:])")
    sidecar.argv = [sys.executable, "-c", limited, *sidecar.argv]
    sidecar.start()
    try:
        async def body():
            sessions, closes, bare, unaccepted = [], [], [], 0
            try:
                # Past the circuit's 5 failures in a row. A session takes two descriptors, the
                # client's and then the provider's: with an even number free, the last accept
                # takes none and no connect fails. Then one session goes, and a bare connection
                # (accepted, its request never sent) takes one: the next accept gets the last.
                while len(closes) < 8:
                    assert len(sessions) < 100, "the limit never ran out"
                    try:
                        ws = await connect(sidecar.url(), additional_headers=sidecar.auth(), open_timeout=5)
                    except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed):  # not accepted
                        unaccepted += 1
                        assert unaccepted < 10, closes
                        await sessions.pop().close()
                        bare.append(await asyncio.open_connection("127.0.0.1", sidecar.port))
                        continue
                    sessions.append(ws)
                    try:
                        await ws.recv()
                    except ConnectionClosed as exc:
                        closes.append((exc.rcvd.code, exc.rcvd.reason))
            finally:
                for ws in sessions:
                    await ws.close()
                for _, writer in bare:
                    writer.close()
            async with connect(sidecar.url(), additional_headers=sidecar.auth()) as ws:
                await ws.recv()                  # served: the provider was not rested
            return closes
        closes = run(body(), timeout=60)
        samples = scrape(sidecar)
    finally:
        sidecar.stop()
    assert set(closes) == {(1014, "sidecar out of resources: Too many open files")}, closes
    assert value(samples, "conduit_deployment_healthy", provider="mock", deployment="0") == 1
    assert value(samples, "conduit_upstream_attempts_total", provider="mock", deployment="0",
                 outcome="local") == len(closes)


def non_loopback_address() -> str:
    """One of this host's own non-loopback IPv4 addresses (packets to 127.0.0.1 from
    it stay on this host but are not from loopback)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[3].split("/")[0]


def admin_request(sidecar, method: str, path: str, source: str, headers: str = "") -> int:
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", sidecar.admin_port))
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.admin_port}\r\nContent-Length: 0\r\n"
                  f"{headers}\r\n".encode())
        return int(s.recv(100).split(b" ", 2)[1])


def test_drain_only_from_loopback(tmp_path, mock_provider):
    """Review finding 2: the admin port listens on every address (Prometheus, the
    kubelet); reads are open to all, POST /drain only to the pod itself (127.0.0.1,
    ::1)."""
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), standard_keys())
    sidecar.env["CONDUIT_ADMIN_LISTEN"] = f"0.0.0.0:{sidecar.admin_port}"
    sidecar.start()
    try:
        outside = non_loopback_address()
        for path in ("/metrics", "/healthz", "/readyz"):
            assert admin_request(sidecar, "GET", path, outside) == 200
        assert admin_request(sidecar, "POST", "/drain", outside) == 403
        # Istio's sidecar forwards other pods' connections from 127.0.0.6: loopback,
        # but not the pod itself
        assert admin_request(sidecar, "POST", "/drain", "127.0.0.6") == 403
        # A web page in a browser on the same host (an agent's headless browser in the
        # app container, a laptop's) posts from 127.0.0.1 too, with its Origin
        assert admin_request(sidecar, "POST", "/drain", "127.0.0.1",
                             "Origin: https://evil.example\r\n") == 403
        assert http_get(sidecar.admin("/readyz"))[0] == 200         # not draining
        assert admin_request(sidecar, "POST", "/drain", "127.0.0.1") == 202
        assert sidecar.proc.wait(10) == 0            # no sessions: the drain ends at once
    finally:
        sidecar.stop()


def test_admin_requests_must_name_an_address_as_host(ops):
    """DNS rebinding: a web page in a browser on the pod's host or in the app container
    rebinds its own name to 127.0.0.1 and reads the admin port as same-origin; its
    requests carry that name as Host. Only an IP literal or localhost is served: what
    Prometheus and the kubelet (the pod IP), curl and `providers --admin` send."""
    def answer(head: str) -> bytes:
        with socket.create_connection(("127.0.0.1", ops.admin_port), timeout=5) as s:
            s.sendall(f"{head}Content-Length: 0\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data

    port = ops.admin_port
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}",
                 f"localhost.evil.example:{port}", "::1", f"[127.0.0.1]:{port}"):
        for method, path in (("GET", "/metrics"), ("GET", "/healthz"), ("POST", "/drain")):
            reply = answer(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n")
            assert reply.startswith(b"HTTP/1.1 421 "), (host, path, reply[:100])
            assert reply.endswith(b"admin requests must name an IP address or localhost as Host\n")
    assert answer("GET /metrics HTTP/1.1\r\n").startswith(b"HTTP/1.1 421 ")               # none
    assert answer(f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil.example\r\n"
                  ).startswith(b"HTTP/1.1 421 ")                                          # two
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"[::1]:{port}", "[::1]", "10.1.2.3:9464",
                 "[fd00:10:244::5]:9464", f"localhost:{port}", "localhost", "LocalHost"):
        reply = answer(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n")
        assert reply.startswith(b"HTTP/1.1 200 ") and b"conduit_connections_active" in reply, host
    assert http_get(f"http://localhost:{port}/healthz") == (200, "ok\n")                # as curl does


def test_admin_connections_are_bounded_per_address_and_in_all(ops):
    """Any pod may connect to the admin port: one address holds at most 8 connections
    at a time (past that a connection gets 503 at once) and all together at most 64,
    each bounded in size and time. At 64 a new connection drops the oldest one still
    sending its request: idle connections from 8 pods once kept the kubelet's probes
    out (503), and failed probes restart the sidecar."""
    def idle(source: str) -> socket.socket:
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", ops.admin_port))
        s.sendall(b"GET /metrics HTTP/1.1\r\n")  # and no more
        return s

    def refused(source: str) -> bool:
        with socket.socket() as s:
            s.bind((source, 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", ops.admin_port))
            answer = s.recv(200)
        return answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b"too many admin connections\n")

    held = [idle("127.0.0.2") for _ in range(8)]
    try:
        time.sleep(0.2)
        assert refused("127.0.0.2")
        assert admin_request(ops, "GET", "/healthz", "127.0.0.3") == 200  # another address
        held += [idle(f"127.0.0.{n}") for n in range(3, 10) for _ in range(8)]  # 64 in all
        time.sleep(0.2)
        assert admin_request(ops, "GET", "/healthz", "127.0.0.10") == 200   # a probe
        assert admin_request(ops, "GET", "/readyz", "127.0.0.11") == 200
        time.sleep(0.2)

        def dropped(s: socket.socket) -> bool:
            s.setblocking(False)
            try:
                return s.recv(100) == b""
            except BlockingIOError:
                return False
        # The oldest idle ones made room: two of ours, or one if an earlier test of
        # this module left an older connection behind.
        gone = [i for i, s in enumerate(held) if dropped(s)]
        assert gone in ([0], [0, 1]), gone
    finally:
        for s in held:
            s.close()
    time.sleep(0.5)
    assert admin_request(ops, "GET", "/healthz", "127.0.0.2") == 200


def test_malformed_usage_is_ignored_and_counted(ops):
    """Review finding 8: a negative count made Counter.inc raise inside the relay's
    callback; right behind the 101 the session was never released. Later review: a
    message nested deeper than msgspec recurses raised RecursionError into the relay."""
    good = {"input_tokens": 3, "output_tokens": 4}

    async def provider(ws):
        await ws.send(json.dumps({"type": "response.done", "response": {"usage": {"input_tokens": -5}}}))
        await ws.send(json.dumps({"type": "response.done", "response": {"usage": {"output_tokens": 10**15}}}))
        # Nested deeper than a parser recurses: RecursionError, not a DecodeError.
        await ws.send('{"type":"response.done","x":' + "[" * 100000 + "]" * 100000 + "}")
        await ws.send(json.dumps({"type": "response.done", "response": {"usage": good}}))
        async for message in ws:
            await ws.send(message)

    async def body():
        async with serve(provider, "127.0.0.1", ops.usage_port):
            async with connect(ops.url(provider="fragmenting"), additional_headers=ops.auth()) as ws:
                for _ in range(4):
                    await ws.recv()
                await ws.send(b"still relaying")
                assert await ws.recv() == b"still relaying"
    before, ends = scrape(ops), len(session_ends(ops))
    run(body())
    ended(ops, ends)
    after = scrape(ops)
    labels = dict(key_id="good", provider="fragmenting", model="mock-realtime")
    d = lambda name, **l: value(after, name, **l) - value(before, name, **l)  # noqa: E731
    assert d("conduit_usage_malformed_total", provider="fragmenting") == 3
    assert d("conduit_usage_tokens_total", kind="input", **labels) == 3
    assert d("conduit_usage_tokens_total", kind="output", **labels) == 4
    assert value(after, "conduit_connections_active") == 0
    assert "Traceback" not in ops.output()


def test_the_admin_port_on_every_address_answers_ipv4_and_ipv6(tmp_path, mock_provider):
    """admin_listen = "*:PORT" (what the injector sets): the kubelet probes the pod's
    IP, which is IPv6 on IPv6-only clusters; 0.0.0.0 alone never answered there and
    the sidecar was restarted for failing its probes."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    for attempt in range(3):
        sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), standard_keys())
        sidecar.env["CONDUIT_ADMIN_LISTEN"] = f"*:{sidecar.admin_port}"
        try:
            sidecar.start()
            break
        except RuntimeError as exc:
            # Binding every address found its held port taken, in about one run in
            # fifteen of the dependency-floor tests (uvloop 0.19) on a loaded machine,
            # never in isolation; not explained. Another port is tried.
            if "address already in use" not in str(exc) or attempt == 2:
                raise
    try:
        for host in ("127.0.0.1", "[::1]"):
            assert http_get(f"http://{host}:{sidecar.admin_port}/readyz")[0] == 200
        assert http_get(f"http://[::1]:{sidecar.admin_port}/drain", method="POST")[0] == 202  # ::1 is the pod
    finally:
        sidecar.stop()
