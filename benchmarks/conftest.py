"""The benchmark suite's machinery: run sizes (full, or quick with
CONDUIT_BENCH_QUICK=1), the columns as processes, a `measure` fixture that repeats an
end-to-end measurement and keeps medians, and the report written at the end.

Tests here assert correctness only (frames delivered, byte counts), never timing.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest
import uvloop
import websockets

from conduit_sidecar.testing import Certs

from . import harness
from .harness import Unavailable
from .loadgen import Target

QUICK = os.environ.get("CONDUIT_BENCH_QUICK") == "1"
RESULTS_MD = os.path.join(os.path.dirname(__file__), "results.md")
LOAD_AT_START = os.getloadavg()[0]     # other work on the machine shows up here


@dataclass(frozen=True)
class Sizes:
    quick: bool
    rounds: int             # repetitions of each end-to-end measurement (median kept)
    warmup: int             # unrecorded repetitions before them
    session_rounds: int
    pingpong: int           # round trips per repetition
    bulk: dict              # frame size -> frames per repetition (naive: a tenth)
    sessions: int           # concurrent sessions, plain
    tls_sessions: int       # concurrent sessions, TLS variants
    session_seconds: float
    handshakes: int         # sessions opened per repetition
    idle: int               # idle sessions held open
    memory: tuple           # (warm-up, idle, burst) sessions for benchmarks.memory
    scanner_bytes: int      # bytes of frames per scanner call
    instructions: tuple     # (warm-up, counted) round trips for benchmarks.instructions --frames


SIZES = (Sizes(quick=True, rounds=1, warmup=0, session_rounds=1, pingpong=200,
               bulk={960: 20000, 65536: 200}, sessions=50, tls_sessions=20, session_seconds=1,
               handshakes=100, idle=100, memory=(100, 100, 200),
               scanner_bytes=1 << 16, instructions=(50, 200)) if QUICK else
         Sizes(quick=False, rounds=5, warmup=1, session_rounds=3, pingpong=3000,
               bulk={960: 500_000, 65536: 8000}, sessions=200, tls_sessions=100,
               session_seconds=5, handshakes=1000, idle=1000, memory=(2000, 1000, 4000),
               scanner_bytes=1 << 20, instructions=(500, 2000)))

# section -> (title, columns, ratios (a, b) reported as a/b)
SECTIONS = {
    "scanner": ("Scanner in process: ns per frame (scan + forward)",
                ["websockets", "sidecar"], [("websockets", "sidecar")]),
    # floor: the stack alone (benchmarks/floor_relay.py), what the sidecar's features add to.
    "plain": ("End to end on loopback, ws on both legs",
              ["direct", "floor", "naive", "nginx", "sidecar", "sidecar-redis"],
              [("sidecar", "nginx"), ("sidecar", "naive"), ("sidecar", "floor"),
               ("sidecar-redis", "sidecar")]),
    # sidecar-uvloop: TLS legs on uvloop's SSL transport (CONDUIT_NATIVE_TLS=0, the
    # fallback build's path), sidecar: encrypted by the relay's OpenSSL calls.
    "tls": ("Provider leg over TLS (upstream wss, verified against the bench CA)",
            ["direct", "naive", "nginx", "sidecar-uvloop", "sidecar"],
            [("sidecar", "nginx"), ("sidecar-uvloop", "nginx"), ("sidecar", "naive")]),
    "listener": ("Client leg over TLS: the sidecar's wss listener vs its ws listener (upstream ws)",
                 ["sidecar", "sidecar-wss-uvloop", "sidecar-wss"],
                 [("sidecar-wss", "sidecar"), ("sidecar-wss-uvloop", "sidecar")]),
    # sidecar-tls: the provider leg over wss, as in production.
    # a usage report with 2,000 more live sessions of its own key, or of other keys
    "governor": ("Governor in process: µs per provider usage report (benchmarks/test_governance.py)",
                 ["alone", "2000-other-keys", "2000-of-its-key"],
                 [("2000-other-keys", "alone"), ("2000-of-its-key", "alone")]),
    "instructions": ("User-space instructions under callgrind (benchmarks/instructions.py)",
                     ["sidecar"], []),
    "memory": ("Memory of a fresh sidecar seen from outside (RSS; benchmarks/memory.py)",
               ["sidecar", "sidecar-tls"], [("sidecar-tls", "sidecar")]),
    "loadgen": (("Load generator CPU share (its CPU time / wall time; near 100% would mean "
                 "it limited the run)"),
                ["direct", "floor", "naive", "nginx", "sidecar", "sidecar-redis", "sidecar-uvloop",
                 "sidecar-wss-uvloop", "sidecar-wss"], []),
}
RESULTS: dict[str, dict[str, dict[str, float]]] = {s: {} for s in SECTIONS}


def record(section: str, row: str, column: str, value: float) -> None:
    RESULTS[section].setdefault(row, {})[column] = value


# -- columns -------------------------------------------------------------------------

class Columns:
    """Every column's processes, started on first use and stopped at the end."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.cache: dict[tuple, object] = {}
        self.processes: list[harness.Process] = []

    def _once(self, key, start):
        if key not in self.cache:
            try:
                self.cache[key] = start()
            except Unavailable as exc:
                self.cache[key] = exc
        value = self.cache[key]
        if isinstance(value, Unavailable):
            raise value
        return value

    def _keep(self, proc_port):
        self.processes.append(proc_port[0])
        return proc_port

    def certs(self) -> Certs:
        return self._once(
            "certs", lambda: harness.bench_certs(self.workdir))

    def upstream(self, tls: bool) -> int:
        certs = self.certs() if tls else None
        return self._once(("upstream", tls),
                          lambda: self._keep(harness.upstream(self.workdir, certs)))[1]

    def target(self, section: str, column: str) -> Target:
        tls = section == "tls"
        certs = self.certs() if tls else None
        up = self.upstream(tls)
        if column == "direct":
            return Target("direct", up, lambda model: f"/{model}",
                          ssl=harness.client_context(certs) if tls else None)
        if column == "floor":  # plain only: it relays ws to 127.0.0.1
            proc, port = self._once("floor", lambda: self._keep(harness.floor(self.workdir, up)))
            return harness.proxy_target(column, proc, port)
        if column in ("naive", "nginx"):
            start = harness.naive if column == "naive" else harness.nginx
            proc, port = self._once((column, tls), lambda: self._keep(start(self.workdir, up, certs)))
            return harness.proxy_target(column, proc, port)
        if column == "sidecar-redis":
            s = self._once(("sidecar-redis",), lambda: self._sidecar(
                up, None, None, redis_port=self._once(
                    ("redis",), lambda: self._keep(harness.redis(self.workdir)))[1]))
            return harness.sidecar_target(column, s)
        listener = self.certs() if section == "listener" else None
        uvloop_tls = column.endswith("-uvloop")
        s = self._once(("sidecar", section, uvloop_tls),
                       lambda: self._sidecar(up, certs, listener, uvloop_tls))
        if column.startswith("sidecar-wss"):
            if s.tls_port is None:
                raise Unavailable("this sidecar build does not serve [tls] listen (nothing accepts on its port)")
            return harness.sidecar_target(column, s, harness.client_context(listener))
        return harness.sidecar_target(column, s)

    def _sidecar(self, up, certs, listener, uvloop_tls=False, redis_port=None):
        s = harness.sidecar(self.workdir, up, certs, listener, redis_port, uvloop_tls)
        self.processes.append(s.process)
        return s

    def stop(self) -> None:
        for proc in self.processes:
            proc.stop()


@pytest.fixture(scope="session")
def columns():
    with tempfile.TemporaryDirectory(prefix="conduit-bench-") as workdir:
        cols = Columns(workdir)
        yield cols
        cols.stop()


@pytest.fixture(scope="session")
def loop():
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


def pytest_configure(config):
    config.addinivalue_line("markers", "sections(*names, proxies=False): run this case for every "
                                       "column of these report sections (with proxies=True, "
                                       "not `direct`)")


def pytest_generate_tests(metafunc):
    mark = metafunc.definition.get_closest_marker("sections")
    if mark and "where" in metafunc.fixturenames:
        where = [(s, c) for s in mark.args for c in SECTIONS[s][1]
                 if not (mark.kwargs.get("proxies") and c == "direct")]
        metafunc.parametrize("where", where, ids=[f"{s}-{c}" for s, c in where])


@pytest.fixture
def section(where) -> str:
    return where[0]


@pytest.fixture
def target(columns, where) -> Target:
    try:
        target = columns.target(*where)
    except Unavailable as exc:
        pytest.skip(f"{where[1]}: {exc}")
    if target.process:
        target.process.check()
    return target


@pytest.fixture(scope="session")
def sizes() -> Sizes:
    return SIZES


@pytest.fixture
def timed(benchmark, sizes):
    """timed(run) -> what run returned, timed by pytest-benchmark (three rounds of one
    call in the quick run, which proves the suite runs)."""
    def go(run):
        if sizes.quick:
            return benchmark.pedantic(run, rounds=3, iterations=1)
        return benchmark(run)
    return go


@pytest.fixture(scope="session")
def report_row():
    """record(section, row, column, value): a figure for the report."""
    return record


@pytest.fixture
def measure(benchmark, loop):
    """measure(section, case, target, make_run, rows[, rounds, warmup]) -> results per round.

    Runs `make_run()` (a coroutine) warm-up + rounds times, keeps the medians of its
    figures in benchmark.extra_info, and records `rows` ({row label: figure}) for
    the report. pytest-benchmark's own timing is the wall time of each round."""

    def go(section, case, target, make_run, rows, rounds=SIZES.rounds, warmup=SIZES.warmup):
        results = []

        def once():
            try:
                results.append(loop.run_until_complete(asyncio.wait_for(make_run(), 300)))
            except Exception:
                if target.process:
                    target.process.check(grace=1)    # a crashed proxy explains the error
                raise

        benchmark.group = f"{section}: {case}"
        benchmark.pedantic(once, rounds=rounds, warmup_rounds=warmup, iterations=1)
        # --benchmark-disable runs a single round and no warm-up.
        results = results[warmup:] or results
        medians = {k: statistics.median(r[k] for r in results)
                   for k, v in results[0].items() if isinstance(v, (int, float))}
        benchmark.extra_info.update(medians)
        for row, key in rows.items():
            record(section, row, target.name, medians[key])
        if "loadgen_cpu" in medians:
            record("loadgen", f"{section}: {case}", target.name, medians["loadgen_cpu"])
        return results

    return go


# -- the report ----------------------------------------------------------------------

def _machine() -> list[str]:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.processor())
    try:
        nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True,
                               check=False).stderr.strip()
    except OSError:
        nginx = "nginx not installed"
    command = " ".join(shlex.quote(a) for a in ["pytest", *sys.argv[1:]])
    return [
        (f"- machine: {os.cpu_count()} CPUs, {cpu}, Linux {platform.release()}, load average "
         f"{LOAD_AT_START:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"),
        (f"- Python {platform.python_version()}, websockets {websockets.version.version}, "
         f"uvloop {uvloop.__version__}, {nginx}"),
        (f"- command: `{command}`{' (CONDUIT_BENCH_QUICK=1)' if QUICK else ''}, "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"),
    ]


def _fmt(v: float | None, percent: bool) -> str:
    if v is None:
        return "—"
    if percent:
        return f"{v:.0%}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def report() -> str:
    lines = ["# Benchmark results", "", *_machine(), ""]
    for section, (title, cols, ratios) in SECTIONS.items():
        rows = RESULTS[section]
        if not rows:
            continue
        head = cols + [f"{a}/{b}" for a, b in ratios]
        lines += [f"## {title}", "", "| case | " + " | ".join(head) + " |",
                  "|---|" + "---:|" * len(head)]
        for row, values in rows.items():
            cells = [_fmt(values.get(c), section == "loadgen") for c in cols]
            for a, b in ratios:
                cells.append(f"{values[a] / values[b]:.2f}" if values.get(a) and values.get(b) else "—")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def pytest_sessionfinish(session, exitstatus):
    if not QUICK and any(RESULTS.values()):
        with open(RESULTS_MD, "w") as f:
            f.write(report())


def pytest_terminal_summary(terminalreporter):
    if any(RESULTS.values()):
        terminalreporter.section("conduit-sidecar benchmarks")
        terminalreporter.write_line(report())
        if not QUICK:
            terminalreporter.write_line(f"written to {RESULTS_MD}")
