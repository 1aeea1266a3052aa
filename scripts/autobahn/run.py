"""Autobahn|Testsuite (RFC 6455 conformance) through the sidecar, with baselines.

Run A: `wstest -m fuzzingclient` tests a WebSocket *server*: the reference echo
provider alone (agent `echo`), then the sidecar in front of it (agent
`conduit-sidecar`). This exercises the sidecar's client-facing leg.

Run B: `wstest -m fuzzingserver` tests a WebSocket *client*: the driver
(`driver.py`, a websockets echo client) connecting directly (agent
`websockets-direct`), then the same driver connecting through the sidecar to a
provider whose URL is the fuzzing server's `runCase` (agent `conduit-sidecar`).
This exercises the sidecar's provider-facing leg.

Run C: run B with the fuzzing server behind TLS (a throwaway CA and leaf): the
sidecar's provider leg is wss, verified, and encrypted the way production's is.

The gate, per run and case by case: the sidecar's result is no worse than the
baseline's (OK < NON-STRICT = INFORMATIONAL < UNIMPLEMENTED < FAILED, compared for
both `behavior` and `behaviorClose`). Cases 12.* and 13.* (permessage-deflate) are
excluded: no compression is negotiated on either leg.

The suite is Python 2 code: it is installed once with Python 2.7's pip into a
cache directory (default `.autobahn/` in the repo root) and started with
`wstest.py`. Everything listens on 127.0.0.1 on free ports.

    python scripts/autobahn/run.py                 # all three runs, gate, summary table
    python scripts/autobahn/run.py --runs a --cases '1.*,2.*'
    python scripts/autobahn/run.py --no-sidecar    # baselines only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field

from conduit_sidecar.testing import (
    Certs,
    Process,
    admin_ready,
    held_port,
    sidecar_command,
    throwaway_certs,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

SUITE_VERSION = "25.10.1"
# The last releases that run the suite on Python 2.7, pinned as a set.
REQUIREMENTS = [
    f"autobahntestsuite=={SUITE_VERSION}",
    "Twisted==19.10.0",
    "autobahn[accelerate,twisted]==0.10.9",
    "txaio==2.1.0",
    "zope.interface==4.6.0",
    "pyOpenSSL==19.1.0",
    "cryptography==3.3.2",
    "service_identity==18.1.0",
    "klein==17.10.0",
    "Werkzeug==1.0.1",
    "jinja2==2.11.3",
    "markupsafe==1.1.1",
    "incremental==16.10.1",
    "unittest2==1.1.0",
    "six==1.16.0",
    "setuptools==44.0.0",
]
EXCLUDE = ["12.*", "13.*"]

# Agents in the reports.
ECHO, SIDECAR, DIRECT = "echo", "conduit-sidecar", "websockets-direct"

# Worse is bigger. UNIMPLEMENTED only appears for the (excluded) compression cases.
RANK = {"OK": 0, "NON-STRICT": 1, "INFORMATIONAL": 1, "UNIMPLEMENTED": 2, "FAILED": 3}
MISSING = 9

# Differences the project has decided to live with: "RUN CASE" -> why. They are still
# listed in the report ("accepted"), but do not fail the gate. Keep this empty unless
# a difference is understood and allowed by the suite's own expectations.
ACCEPTED_WORSE: dict[str, str] = {}

# --- KEY PRESENTATION: the one place that decides how the test key reaches the sidecar.
# The fuzzingclient cannot add HTTP headers (its per-server spec has no "headers"
# entry), but it announces the spec's "protocols" as Sec-WebSocket-Protocol, and the
# sidecar accepts the key as the `openai-insecure-api-key.<key>` subprotocol (and does
# not echo it back). The driver (websockets) sends an Authorization header.
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."


def fuzzingclient_key_options(key: str) -> dict:
    """Entries for the fuzzingclient's per-server spec that present `key`."""
    return {"protocols": [KEY_SUBPROTOCOL_PREFIX + key]}


def driver_key_headers(key: str) -> list[str]:
    """`--header` arguments for driver.py that present `key`."""
    return [f"Authorization: Bearer {key}"]
# --- end of KEY PRESENTATION


class SetupError(RuntimeError):
    """The harness could not set itself up (no Python 2, install failed, ...)."""


def log(msg: str) -> None:
    print(f"[autobahn] {msg}", flush=True)


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise SetupError(f"{what} not listening on {port} after {timeout:.0f}s")


# ---------------------------------------------------------------- installing the suite

def find_python2() -> str:
    """A Python 2.7 interpreter: $AUTOBAHN_PYTHON2, pyenv's 2.7.*, or python2.7 on PATH."""
    candidates = [os.environ.get("AUTOBAHN_PYTHON2")]
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    if shutil.which("pyenv"):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            pyenv_root = subprocess.run(["pyenv", "root"], capture_output=True, text=True,
                                        timeout=10).stdout.strip() or pyenv_root
    candidates += sorted(glob.glob(os.path.join(pyenv_root, "versions", "2.7*", "bin", "python")),
                         reverse=True)
    candidates += [shutil.which("python2.7"), shutil.which("python2")]
    for python in filter(None, candidates):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            probe = subprocess.run([python, "-c", "import sys; assert sys.version_info[:2] == (2, 7)"],
                                   capture_output=True, timeout=20)
            if probe.returncode == 0:
                return python
    raise SetupError("Autobahn|Testsuite needs Python 2.7: set AUTOBAHN_PYTHON2 "
                     "(e.g. `pyenv install 2.7.18`)")


def ensure_suite(cache_dir: str, python2: str) -> str:
    """Install the pinned suite into `cache_dir` once; returns the site directory."""
    site_dir = os.path.join(cache_dir, f"suite-{SUITE_VERSION}")
    stamp = os.path.join(site_dir, ".requirements")
    wanted = "\n".join(REQUIREMENTS) + "\n"
    with contextlib.suppress(OSError), open(stamp) as f:
        if f.read() == wanted:
            return site_dir
    log(f"installing autobahntestsuite {SUITE_VERSION} (Python 2.7) into {site_dir}")
    tmp = site_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([python2, "-m", "pip", "install", "--no-warn-script-location",
                           "--target", tmp, *REQUIREMENTS],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SetupError("pip install of the suite failed:\n" + proc.stdout[-4000:] + proc.stderr[-4000:])
    with open(os.path.join(tmp, ".requirements"), "w") as f:
        f.write(wanted)
    shutil.rmtree(site_dir, ignore_errors=True)
    os.replace(tmp, site_dir)
    return site_dir


# ---------------------------------------------------------------- processes

def new_key(workdir: str) -> tuple[str, dict]:
    """`conduit-sidecar keys new --id autobahn`: the key and its key-file entry."""
    out = subprocess.run([*sidecar_command(), "keys", "new", "--id", "autobahn"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SetupError(f"`conduit-sidecar keys new` failed: {out.stderr.strip()}")
    key = entry = None
    for line in out.stdout.splitlines():
        if line.startswith("key:"):
            key = line.split(":", 1)[1].strip()
        elif line.startswith("{"):
            entry = json.loads(line)
    if not key or not entry:
        raise SetupError(f"unexpected `keys new` output:\n{out.stdout}")
    return key, entry


def start_sidecar(workdir: str, echo_port: int, fuzz_port: int | None,
                  tls_port: int | None = None, ca_file: str | None = None) -> tuple[Process, int, str]:
    key, entry = new_key(workdir)
    keys_file = os.path.join(workdir, "keys.json")
    with open(keys_file, "w") as f:
        json.dump({"keys": [entry]}, f)
    port, admin_port = held_port(), held_port()
    conf = os.path.join(workdir, "sidecar.toml")
    providers = f"""
        [providers.echo]
        url = "ws://127.0.0.1:{echo_port}/?model={{model}}"
        """
    if fuzz_port:
        providers += f"""
        [providers.autobahn]
        url = "ws://127.0.0.1:{fuzz_port}/runCase?case={{model}}&agent={SIDECAR}"
        """
    if tls_port:
        providers += f"""
        [providers.autobahn-tls]
        url = "wss://127.0.0.1:{tls_port}/runCase?case={{model}}&agent={SIDECAR}"
        ca_file = "{ca_file}"
        """
    with open(conf, "w") as f:
        f.write(textwrap.dedent(f"""\
            listen = "127.0.0.1:{port}"
            admin_listen = "127.0.0.1:{admin_port}"
            keys_file = "{keys_file}"

            [limits]
            max_message_bytes = 67108864

            # The fuzzing server breaks the protocol on purpose, case after case: each
            # counts as a deployment's early close, and 5 in a row rested it (1014 for
            # every case after). No case is to be skipped for that.
            [circuit]
            failures = 1000000
            """) + textwrap.dedent(providers))
    sidecar = Process("sidecar", [*sidecar_command(), "serve", "--config", conf],
                      os.path.join(workdir, "sidecar.log")).start(admin_ready(admin_port), timeout=30)
    return sidecar, port, key


def start_echo(workdir: str) -> tuple[Process, int]:
    port = held_port()
    echo = Process("echo", [sys.executable, os.path.join(HERE, "echo.py"), "--port", str(port)],
                   os.path.join(workdir, "echo.log")).start()
    wait_port(port, echo.proc, "echo provider")
    return echo, port


def wstest(python2: str, site_dir: str, mode: str, spec: dict, workdir: str, name: str) -> Process:
    spec_path = os.path.join(workdir, f"{name}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=2)
    argv = [python2, os.path.join(HERE, "wstest.py"), site_dir, "-m", mode, "-s", spec_path]
    if mode == "fuzzingserver":
        argv += ["--webport", "0"]
    return Process(f"wstest {mode}", argv, os.path.join(workdir, f"{name}.log"), cwd=workdir,
                   env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}).start()


# ---------------------------------------------------------------- the two runs

@dataclass
class Options:
    cases: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: list(EXCLUDE))
    runs: str = "abc"
    sidecar: bool = True
    out: str = os.path.join(ROOT, ".autobahn", "reports")
    cache: str = os.path.join(ROOT, ".autobahn")
    timeout: float = 600.0            # per wstest run / per driver run
    case_timeout: float = 60.0        # per case, in run B's driver
    attempts: int = 3                 # a worse case must be worse in each of these


def run_a(opts: Options, python2: str, site_dir: str, workdir: str, echo_port: int,
          sidecar_port: int | None, key: str | None, cases: list[str], name: str) -> str:
    """fuzzingclient against the echo alone, then the sidecar in front of it."""
    outdir = os.path.join(opts.out, name)
    shutil.rmtree(outdir, ignore_errors=True)
    servers = [{"agent": ECHO, "url": f"ws://127.0.0.1:{echo_port}/"}]
    if sidecar_port:
        servers.append({"agent": SIDECAR,
                        "url": f"ws://127.0.0.1:{sidecar_port}/v1/realtime/connect"
                               "?model=echo&provider=echo",
                        **fuzzingclient_key_options(key)})
    spec = {"outdir": outdir, "servers": servers, "cases": cases,
            "exclude-cases": opts.exclude, "exclude-agent-cases": {}}
    log(f"{name}: fuzzingclient against {', '.join(s['agent'] for s in servers)}")
    proc = wstest(python2, site_dir, "fuzzingclient", spec, workdir, f"{name}-fuzzingclient")
    code = proc.wait(opts.timeout)
    proc.stop()
    index = os.path.join(outdir, "index.json")
    if code != 0 or not os.path.exists(index):
        raise SetupError(f"fuzzingclient exited with {code}:\n{proc.tail()}")
    return index


def run_b(opts: Options, python2: str, site_dir: str, workdir: str, fuzz_port: int,
          sidecar_port: int | None, key: str | None, cases: list[str], name: str,
          tls: Certs | None = None) -> str:
    """fuzzingserver; the driver directly, then the driver through the sidecar. With
    `tls` (run C) the fuzzing server listens with TLS: the sidecar's provider leg is
    wss, verified against `tls.ca`, and so is the direct driver's connection."""
    outdir = os.path.join(opts.out, name)
    shutil.rmtree(outdir, ignore_errors=True)
    fuzz = f"{'wss' if tls else 'ws'}://127.0.0.1:{fuzz_port}"
    spec = {"url": fuzz, "outdir": outdir, "cases": cases,
            "exclude-cases": opts.exclude, "exclude-agent-cases": {}}
    if tls:
        spec.update(cert=tls.cert, key=tls.key)
    server = wstest(python2, site_dir, "fuzzingserver", spec, workdir, f"{name}-fuzzingserver")
    try:
        wait_port(fuzz_port, server.proc, "fuzzingserver")
        driver = [sys.executable, os.path.join(HERE, "driver.py"), "--fuzz", fuzz, "-v",
                  "--case-timeout", str(opts.case_timeout)]
        runs = [(DIRECT, [])]
        if sidecar_port:
            via = (f"ws://127.0.0.1:{sidecar_port}/v1/realtime/connect"
                   f"?model={{case}}&provider=autobahn{'-tls' if tls else ''}")
            runs.append((SIDECAR, ["--via", via,
                                   *(a for h in driver_key_headers(key) for a in ("--header", h))]))
        for agent, extra in runs:
            log(f"{name}: fuzzingserver, driver as {agent}")
            proc = Process(f"driver {agent}", [*driver, "--agent", agent, *extra],
                           os.path.join(workdir, f"{name}-driver-{agent}.log"),
                           # websockets' default context trusts the test CA this way.
                           env={**os.environ, "SSL_CERT_FILE": tls.ca} if tls else None).start()
            code = proc.wait(opts.timeout)
            proc.stop()
            if code != 0:
                raise SetupError(f"driver ({agent}) exited with {code}:\n{proc.tail()}")
        index = os.path.join(outdir, "index.json")
        deadline = time.monotonic() + 30
        while not os.path.exists(index) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not os.path.exists(index):
            raise SetupError(f"fuzzingserver wrote no index.json:\n{server.tail()}")
        return index
    finally:
        server.stop()


# ---------------------------------------------------------------- comparing reports

def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in case_id.split("."))


def load_index(path: str) -> dict[str, dict[str, dict]]:
    with open(path) as f:
        return json.load(f)


@dataclass
class Worse:
    case: str
    baseline: dict
    candidate: dict | None
    detail: str = ""
    attempts: int = 1              # in how many attempts (all of them) it was worse

    def __str__(self) -> str:
        b = f"{self.baseline['behavior']}/{self.baseline['behaviorClose']}"
        c = ("missing" if self.candidate is None
             else f"{self.candidate['behavior']}/{self.candidate['behaviorClose']}")
        return (f"{self.case}: baseline {b} -> sidecar {c}, in {self.attempts} of "
                f"{self.attempts} attempts" + (f" ({self.detail})" if self.detail else ""))


def _rank(result: dict | None, what: str) -> int:
    return MISSING if result is None else RANK.get(result.get(what, ""), MISSING)


def compare(index_path: str, baseline: str, candidate: str) -> list[Worse]:
    """Cases where `candidate` did worse than `baseline` (behavior or behaviorClose)."""
    index = load_index(index_path)
    base, cand = index.get(baseline, {}), index.get(candidate, {})
    worse = []
    for case in sorted(base, key=case_key):
        b, c = base[case], cand.get(case)
        if any(_rank(c, w) > _rank(b, w) for w in ("behavior", "behaviorClose")):
            worse.append(Worse(case, b, c, case_detail(os.path.dirname(index_path), c)))
    return worse


def case_detail(outdir: str, result: dict | None) -> str:
    """What the suite said about a case: its result texts and close codes."""
    if not result or not result.get("reportfile"):
        return ""
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(outdir, result["reportfile"])) as f:
            report = json.load(f)
        parts = [report.get("result", ""), report.get("resultClose", "")]
        parts.append(f"remote close {report.get('remoteCloseCode')}"
                     f" {report.get('remoteCloseReason') or ''}".rstrip())
        return "; ".join(p for p in parts if p)
    return ""


def counts(index_path: str) -> dict[str, dict[str, int]]:
    """Per agent: how many cases ended OK / NON-STRICT / INFORMATIONAL / ... (behavior)."""
    out = {}
    for agent, cases in load_index(index_path).items():
        tally: dict[str, int] = {}
        for result in cases.values():
            tally[result["behavior"]] = tally.get(result["behavior"], 0) + 1
        tally["total"] = len(cases)
        tally["seconds"] = round(sum(r.get("duration", 0) for r in cases.values()) / 1000, 1)
        out[agent] = tally
    return out


def table(summary: dict) -> str:
    cols = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED", "total"]
    lines = ["| run | agent | " + " | ".join(cols) + " | case time (s) |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for run, agents in summary.items():
        for agent, tally in agents.items():
            lines.append(f"| {run} | {agent} | " + " | ".join(str(tally.get(c, 0)) for c in cols)
                         + f" | {tally.get('seconds', 0)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- all of it

@dataclass
class Result:
    indexes: dict[str, str]                      # run -> index.json
    summary: dict[str, dict[str, dict]]          # run -> agent -> counts
    worse: dict[str, list[Worse]]                # run -> cases worse through the sidecar
    seconds: dict[str, float]                    # phase -> wall time

    def failing(self, run: str) -> list[Worse]:
        """The cases of `run` that fail the gate: worse, and not accepted."""
        return [w for w in self.worse.get(run, []) if f"{run} {w.case}" not in ACCEPTED_WORSE]

    @property
    def ok(self) -> bool:
        return not any(self.failing(run) for run in self.worse)

    def report(self) -> str:
        lines = [table(self.summary), "",
                 "wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items())]
        for run, worse in self.worse.items():
            lines.append(f"run {run}: {len(self.failing(run))} case(s) worse through the sidecar")
            for w in worse:
                why = ACCEPTED_WORSE.get(f"{run} {w.case}")
                lines.append(f"  {w}" + (f" [accepted: {why}]" if why else ""))
        return "\n".join(lines)


def run_all(opts: Options) -> Result:
    started = time.monotonic()
    seconds: dict[str, float] = {}
    python2 = find_python2()
    site_dir = ensure_suite(opts.cache, python2)
    seconds["install"] = time.monotonic() - started
    os.makedirs(opts.out, exist_ok=True)
    for stale in glob.glob(os.path.join(opts.out, "run-*")):     # reports of an earlier run
        shutil.rmtree(stale, ignore_errors=True)
    workdir = os.path.join(opts.out, "work")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    procs: list[Process] = []
    indexes, worse = {}, {}

    def gate(run: str, baseline: str, execute) -> tuple[str, str, list[Worse], float]:
        """One run, and its cases worse through the sidecar; (run, index, worse, seconds)."""
        t = time.monotonic()
        index = execute(opts.cases, f"run-{run.lower()}")
        found: list[Worse] = []
        if opts.sidecar:
            found = compare(index, baseline, SIDECAR)
            # Some cases race by design (e.g. 3.4: an echo against a frame that fails the
            # connection, sent octet by octet): a difference counts only if it shows
            # again in every retry of those cases, baseline and sidecar side by side.
            for attempt in range(2, opts.attempts + 1):
                if not found:
                    break
                again = compare(execute([w.case for w in found], f"run-{run.lower()}-retry{attempt - 1}"),
                                baseline, SIDECAR)
                still = {w.case for w in again}
                found = [w for w in found if w.case in still]
                for w in found:
                    w.attempts = attempt
        return run, index, found, time.monotonic() - t
    try:
        echo, echo_port = start_echo(workdir)
        procs.append(echo)
        fuzz_port = held_port() if "b" in opts.runs else None
        tls_port = held_port() if "c" in opts.runs else None
        certs = throwaway_certs(workdir, ("127.0.0.1",), "autobahn test CA") if tls_port else None
        sidecar_port = key = None
        if opts.sidecar:
            sidecar, sidecar_port, key = start_sidecar(workdir, echo_port, fuzz_port, tls_port,
                                                       certs.ca if certs else None)
            procs.append(sidecar)
        plan = []
        if "a" in opts.runs:
            plan.append(("A", ECHO, lambda cases, name: run_a(
                opts, python2, site_dir, workdir, echo_port, sidecar_port, key, cases, name)))
        if "b" in opts.runs:
            plan.append(("B", DIRECT, lambda cases, name: run_b(
                opts, python2, site_dir, workdir, fuzz_port, sidecar_port, key, cases, name)))
        if "c" in opts.runs:
            plan.append(("C", DIRECT, lambda cases, name: run_b(
                opts, python2, site_dir, workdir, tls_port, sidecar_port, key, cases, name,
                certs)))
        # The runs share only the sidecar (and run A the echo): they go side by side.
        # Most of a run's time is the suite's own waiting (6.4.* wait 2 s a case, 5.19
        # and 5.20 1 s), case after case, agent after agent.
        with concurrent.futures.ThreadPoolExecutor(len(plan) or 1) as pool:
            for future in [pool.submit(gate, run, baseline, execute) for run, baseline, execute in plan]:
                run, indexes[run], found, seconds[f"run {run}"] = future.result()
                if opts.sidecar:
                    worse[run] = found
    finally:
        for proc in reversed(procs):
            proc.stop()
    seconds["total"] = time.monotonic() - started
    summary = {run: counts(path) for run, path in indexes.items()}
    result = Result(indexes, summary, worse, seconds)
    with open(os.path.join(opts.out, "summary.json"), "w") as f:
        json.dump({"summary": summary, "seconds": seconds,
                   "worse": {r: [str(w) for w in ws] for r, ws in worse.items()}}, f, indent=2)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="abc",
                   help="any of 'a', 'b', 'c' (run B over TLS); default: 'abc'")
    p.add_argument("--cases", default="*", help="comma-separated case patterns (default: *)")
    p.add_argument("--no-sidecar", action="store_true", help="baselines only")
    p.add_argument("--out", default=Options.out, help="reports directory")
    p.add_argument("--cache", default=Options.cache, help="where the suite is installed")
    p.add_argument("--attempts", type=int, default=Options.attempts,
                   help="run a case that is worse through the sidecar up to this many times "
                        "in all; it counts only if it is worse every time (default: 3)")
    args = p.parse_args(argv)
    opts = Options(cases=[c.strip() for c in args.cases.split(",") if c.strip()],
                   runs=args.runs.lower(), sidecar=not args.no_sidecar,
                   out=os.path.abspath(args.out), cache=os.path.abspath(args.cache),
                   attempts=max(1, args.attempts))
    try:
        result = run_all(opts)
    except RuntimeError as exc:     # SetupError, or a child that failed to start or finish
        log(f"error: {exc}")
        return 2
    print(result.report())
    log(f"reports: {', '.join(result.indexes.values())}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
