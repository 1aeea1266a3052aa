"""End to end over loopback, each proxy in its own process, the fast upstream in
another (docs/benchmarks.md). Every case runs for each column of the report
sections in its `sections` mark; it asserts only that everything was delivered."""

import pytest

from . import loadgen

FPS = 50


@pytest.mark.sections("plain", "tls", "listener")
def test_ping_pong(measure, target, section, sizes):
    results = measure(section, "ping-pong", target,
                      lambda: loadgen.ping_pong(target, sizes.pingpong),
                      {"ping-pong 960 B: round trip p50 (µs)": "p50_us",
                       "ping-pong 960 B: round trip p99 (µs)": "p99_us"})
    assert all(r["frames"] == sizes.pingpong for r in results)


def bulk(measure, target, section, direction, size, count):
    way = "client→upstream" if direction == "up" else "upstream→client"
    case = f"bulk {way} {size if size < 1024 else size // 1024} {'B' if size < 1024 else 'KiB'}"
    run = loadgen.bulk_up if direction == "up" else loadgen.bulk_down
    results = measure(section, case, target, lambda: run(target, size, count),
                      {f"{case}: frames/s": "frames_per_s", f"{case}: MB/s": "MB_per_s"})
    assert all(r["bytes"] == r["expected"] for r in results)


@pytest.mark.sections("plain", "tls")
@pytest.mark.parametrize("direction", ["up", "down"])
def test_bulk_960(measure, target, section, sizes, direction):
    # naive moves small frames some 30 times slower: fewer, for a similar run time.
    count = sizes.bulk[960] // (10 if target.name == "naive" else 1)
    bulk(measure, target, section, direction, 960, count)


@pytest.mark.sections("plain")
@pytest.mark.parametrize("direction", ["up", "down"])
def test_bulk_64k(measure, target, section, sizes, direction):
    bulk(measure, target, section, direction, 65536, sizes.bulk[65536])


@pytest.mark.sections("plain", "tls", "listener")
def test_sessions(measure, target, section, sizes):
    n = sizes.sessions if section == "plain" else sizes.tls_sessions
    case = f"{n} sessions × {FPS} frames/s, 960 B"
    rows = {f"{case}: round trip p50 (µs)": "p50_us", f"{case}: round trip p99 (µs)": "p99_us"}
    if target.name != "direct":
        rows[f"{case}: proxy CPU µs per relayed frame"] = "cpu_us_per_frame"
    results = measure(section, case, target,
                      lambda: loadgen.sessions(target, n, FPS, sizes.session_seconds),
                      rows, rounds=sizes.session_rounds, warmup=0)
    assert all(r["received"] == r["sent"] > 0 for r in results)


@pytest.mark.sections("plain", "tls", "listener")
@pytest.mark.parametrize("parallel", [4, 50])
def test_handshakes(measure, target, section, sizes, parallel):
    rows = {f"new sessions per second ({parallel} at a time)": "sessions_per_s"}
    if target.name != "direct":
        rows[f"proxy CPU µs per new session ({parallel} at a time)"] = "proxy_cpu_us_per_session"
    results = measure(section, f"handshakes, {parallel} at a time", target,
                      lambda: loadgen.handshakes(target, sizes.handshakes, parallel), rows)
    assert all(r["sessions"] == sizes.handshakes for r in results)


@pytest.mark.sections("plain", proxies=True)  # memory of a proxy: `direct` has none
def test_idle_sessions(measure, target, section, sizes):
    # One round: freed sessions leave memory that a repeat would reuse.
    results = measure(section, "idle sessions", target,
                      lambda: loadgen.idle(target, sizes.idle),
                      {f"{sizes.idle:,} idle sessions: proxy RSS KiB per session": "kib_per_session"},
                      rounds=1, warmup=0)
    assert results[0]["sessions"] == sizes.idle
