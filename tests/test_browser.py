"""A real browser: headless Chromium (Debian's `chromium`) driven by playwright-core.

The page (tests/browser/index.html) is served from 127.0.0.1 by a Python http.server
and opens `new WebSocket(url, ['realtime', 'openai-insecure-api-key.' + key])` against
the sidecar (a real process) in front of the mock provider: it receives
`session.created`, sends `session.update` and PCM16 audio as ArrayBuffers, and gets
`session.updated` and the audio back byte for byte. A wrong key is seen as close 4001
in `onclose`; a page from an origin not in `allowed_origins` cannot connect at all.

Needs /usr/bin/chromium (`bash scripts/install_browser.sh`) and playwright-core in
tests/node/node_modules (`npm install --prefix tests/node`). Skips only if Chromium is
absent.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import urllib.parse

import pytest

from conftest import SidecarProcess, held_port, standard_keys

HERE = os.path.dirname(os.path.abspath(__file__))
BROWSER_DIR = os.path.join(HERE, "browser")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NODE_MODULES = os.environ.get("CONDUIT_NODE_MODULES", os.path.join(HERE, "node", "node_modules"))

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"Chromium not found at {CHROMIUM}: run `sudo bash scripts/install_browser.sh` "
           "(apt-get install -y chromium)")


def pcm16(samples: int, seed: int) -> bytes:
    """The page's PCM16 sawtooth (tests/browser/index.html, `pcm16`)."""
    return b"".join(struct.pack("<h", (i * 997 + seed) % 65536 - 32768) for i in range(samples))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def page_server():
    """tests/browser/ over HTTP on 127.0.0.1, in a thread."""
    handler = functools.partial(_Quiet, directory=BROWSER_DIR)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


# A provider that, like Gemini, ElevenLabs, Deepgram or AssemblyAI, selects no
# subprotocol: sends `session.created`, then echoes.
PLAIN_PROVIDER = """
import asyncio, sys
from websockets.asyncio.server import serve

async def handler(ws):
    await ws.send('{"type":"session.created"}')
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(handler, "127.0.0.1", int(sys.argv[1]), compression=None):
        print("ready", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def plain_provider():
    port = held_port()
    proc = subprocess.Popen([sys.executable, "-c", PLAIN_PROVIDER, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout.readline().strip() == b"ready"
    yield port
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def browser_sidecar(mock_provider, plain_provider, page_server):
    """A sidecar that admits only pages served from http://127.0.0.1:<page port>."""
    providers = f"""
        {mock_provider.section()}

        [providers.plain]
        url = "ws://127.0.0.1:{plain_provider}/"
        """
    proc = SidecarProcess(tempfile.mkdtemp(prefix="conduit-browser-"), providers, standard_keys(),
                          extra=f'allowed_origins = ["http://127.0.0.1:{page_server}"]').start()
    yield proc
    proc.stop()


def drive(*urls: str, timeout: float = 120) -> dict:
    """Open each page in one headless Chromium; returns {url: window.results}."""
    node = shutil.which("node")
    assert node, "node is required for the browser test"
    assert os.path.isdir(os.path.join(NODE_MODULES, "playwright-core")), (
        f"playwright-core not found in {NODE_MODULES}: run `npm install --prefix tests/node` "
        "(tests/node/package.json lists it)")
    result = subprocess.run(
        [node, os.path.join(BROWSER_DIR, "drive.mjs"), *urls], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "CHROMIUM": CHROMIUM, "CONDUIT_NODE_MODULES": NODE_MODULES})
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def page_url(host: str, port: int, sidecar, key: str, scenario: str, provider: str = "mock",
             protocols: str = "realtime") -> str:
    query = urllib.parse.urlencode({
        "ws": f"ws://127.0.0.1:{sidecar.port}/v1/realtime/connect?model=mock-realtime&provider={provider}",
        "key": key, "scenario": scenario, "protocols": protocols})
    return f"http://{host}:{port}/index.html?{query}"


def test_browser_session_and_wrong_key(browser_sidecar, page_server):
    good = page_url("127.0.0.1", page_server, browser_sidecar, browser_sidecar.keys.plain["good"],
                    "session")
    wrong = page_url("127.0.0.1", page_server, browser_sidecar, "condt_wrong_key", "hello")
    # Same page and key, but served from http://localhost:<port>: not an allowed origin.
    foreign = page_url("localhost", page_server, browser_sidecar, browser_sidecar.keys.plain["good"],
                       "session")
    results = drive(good, wrong, foreign)

    session = results[good]
    assert "Chrome" in session["userAgent"]
    assert session["opened"] and session["protocol"] == "realtime", session
    assert session["events"] == ["session.created", "session.updated"], session
    assert session["updated"]["instructions"] == "from a real browser"
    frames = [pcm16(480, 1), pcm16(35000, 7)]
    expected = [{"bytes": len(f), "sha256": hashlib.sha256(f).hexdigest()} for f in frames]
    assert session["sent"] == expected                     # the page sent these PCM16 bytes
    assert session["binary"] == [{**e, "identical": True} for e in expected]    # and got them back
    assert session["close"] == {"code": 1000, "reason": "done", "wasClean": True}
    assert session["errors"] == 0

    rejected = results[wrong]
    assert rejected["opened"] and rejected["protocol"] == "realtime"
    assert rejected["close"] == {"code": 4001, "reason": "unknown key", "wasClean": True}
    assert rejected["events"] == [] and rejected["errors"] == 0

    # The browser only sees a failed handshake (the sidecar answered 403, see the log).
    refused = results[foreign]
    assert not refused["opened"] and refused["errors"] == 1
    assert refused["close"]["code"] == 1006 and not refused["close"]["wasClean"]
    log = browser_sidecar.log_lines()
    assert any(line.get("event") == "refused" and line.get("status") == 403 for line in log), log

    # The key is not in the sidecar's log.
    output = browser_sidecar.output()
    assert browser_sidecar.keys.plain["good"] not in output and "condt_wrong_key" not in output


def test_a_browser_must_offer_a_subprotocol_besides_the_key(browser_sidecar, page_server):
    """Chromium fails a handshake whose 101 selects no subprotocol when it offered some
    ("Sent non-empty 'Sec-WebSocket-Protocol' header but no response was received").
    The sidecar never echoes the key subprotocol, so a page that offers only the key
    cannot connect: docs/providers.md tells browsers to offer `realtime` first."""
    key_only = page_url("127.0.0.1", page_server, browser_sidecar, browser_sidecar.keys.plain["good"],
                        "session", protocols="")
    result = drive(key_only)[key_only]
    assert not result["opened"] and result["close"]["code"] == 1006, result


def test_browser_reaches_a_provider_that_selects_no_subprotocol(browser_sidecar, page_server):
    url = page_url("127.0.0.1", page_server, browser_sidecar, browser_sidecar.keys.plain["good"],
                   "hello", provider="plain")
    result = drive(url)[url]
    assert result["opened"] and result["events"] == ["session.created"], result
