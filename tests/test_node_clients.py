"""Node.js clients with the npm `ws` package, shaped like the Conduit docs' classes."""

import asyncio
import json
import os
import shutil
import subprocess

import pytest
from conftest import run, switching_protocols

NODE_DIR = os.path.join(os.path.dirname(__file__), "node")

pytestmark = pytest.mark.skipif(
    not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "ws")) or not shutil.which("node"),
    reason="run `npm install --prefix tests/node` (the README's test command does)")


def node(script, *args, timeout=60):
    result = subprocess.run(["node", os.path.join(NODE_DIR, script), *args], capture_output=True,
                            text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def base(sidecar):
    return f"ws://127.0.0.1:{sidecar.port}"


def test_ws_client_frames_both_ways(sidecar):
    code, out = node("relay_test.mjs", base(sidecar), sidecar.keys.plain["good"])
    assert code == 0, out
    assert json.loads(out)["sessionCreated"]


@pytest.mark.parametrize("key", ["condt_unknown", None])
def test_resilient_client_does_not_reconnect_after_4001(sidecar, key):
    code, out = node("resilient_test.mjs", base(sidecar), key or sidecar.keys.plain["disabled"])
    assert code == 0, out
    result = json.loads(out)
    assert result["connects"] == 1, result
    assert result["closes"][0][0] == 4001
    assert result["closes"][0][1] in ("unknown key", "key disabled")


REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference",
                         "conduit-real-time-audio.md")


@pytest.mark.skipif(not os.path.exists(REFERENCE), reason="../shared/reference is not beside the checkout")
def test_the_reference_pages_classes_work_unchanged(sidecar):
    """The docs' four classes as printed (only their placeholder origin replaced), on the
    `ws` 7 they were written for."""
    code, out = node("reference_classes.mjs", REFERENCE, base(sidecar), sidecar.keys.plain["good"], "down")
    assert code == 0, out
    result = json.loads(out)
    assert result["placeholders"] == 1
    assert result["classes"] == ["ConduitRealTimeAudio", "ResilientRealTimeAudio",
                                 "ValidatedRealTimeAudio", "MonitoredRealTimeAudio"]
    basic = result["basic"]
    # Text frames reach onTextMessage parsed, binary ones onAudioData as the bytes sent.
    assert basic["opened"] and basic["echoed"] and basic["audioEqual"], basic
    assert basic["types"][:1] == ["session.created"] and "session.updated" in basic["types"], basic
    # disconnect() closes without a code; the answer is a normal closure, so the docs'
    # policy (which reconnects on anything but 1000, 1002 and 4001) stays disconnected.
    assert basic["closeCode"] == 1000
    # 4001 is final for the docs' policy; 1014 (provider down) is retried until its cap.
    assert result["badKey"] == {"connects": 1, "logs": ["Connection closed: 4001 unknown key"] * 2}
    down = result["providerDown"]
    assert down["connects"] == 3, down
    assert down["logs"][0].startswith("Connection closed: 1014 upstream"), down
    assert down["logs"][-1] == "Max reconnection attempts reached", down
    assert result["disconnected"] == {"connects": 1, "logs": ["Connection closed: 1000 "] * 2}
    assert result["validated"] == {"types": ["session.created", "session.updated"], "refused": True}
    stats = result["monitored"]
    assert (stats["messagesSent"], stats["bytesSent"]) == (2, 1440), stats
    assert (stats["messagesReceived"], stats["bytesReceived"]) == (3, 1440), stats
    assert stats["isHealthy"], stats


@pytest.mark.skipif(not os.path.exists(REFERENCE), reason="../shared/reference is not beside the checkout")
def test_the_reference_policy_retries_after_a_providers_protocol_violation(sidecar, upstream_ports):
    """A provider that breaks the protocol (here a masked frame) fails the session; the
    client did nothing wrong. It got 1002, on which the docs' policy gives up for good
    (that code says the client broke the protocol): it gets 1014, as when the provider
    is unreachable, and the policy retries up to its cap."""
    async def provider(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(switching_protocols(head) + bytes([0x82, 0x81, 1, 2, 3, 4, ord("x") ^ 1]))
        await reader.read()
        writer.close()

    async def body():
        server = await asyncio.start_server(provider, "127.0.0.1", upstream_ports["raw"])
        try:
            proc = await asyncio.create_subprocess_exec(
                "node", os.path.join(NODE_DIR, "reference_classes.mjs"), REFERENCE, base(sidecar),
                sidecar.keys.plain["good"], "down", "raw", stdout=subprocess.PIPE)
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            return json.loads(out)
        finally:
            server.close()
    result = run(body())
    assert result["logs"][0] == "Connection closed: 1014 upstream: masked frame from the upstream", result
    assert result["connects"] == 3 and result["logs"][-1] == "Max reconnection attempts reached", result
