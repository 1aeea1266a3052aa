"""Agent frameworks built on OpenAI Realtime, unchanged but for their endpoint and with
a virtual key as their API key, through the sidecar to the OpenAI mock: openai-agents
(Python), @openai/agents-realtime (Node) and LiveKit's OpenAI realtime plugin.

The Python clients run in their own virtualenv, tests/agents/.venv (scripts/test.sh
makes it): openai-agents pins websockets<17 (ours needs 17) and livekit-agents brings
~400 MB (av, numpy, grpc, the LiveKit RTC library). A client needs nothing of ours."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import PROVIDER_SECRET, SidecarProcess, ThreadMock, mock_section, standard_keys

HERE = os.path.dirname(__file__)
AGENTS_PY = os.path.join(HERE, "agents", ".venv", "bin", "python")
NODE_DIR = os.path.join(HERE, "node")


@pytest.fixture(scope="module")
def agents_sidecar():
    """A sidecar in front of an OpenAI mock whose handshakes the tests can read."""
    mock = ThreadMock("openai")
    proc = SidecarProcess(tempfile.mkdtemp(prefix="conduit-agents-"), mock_section(mock.port),
                          standard_keys()).start()
    proc.mock = mock.mock
    yield proc
    proc.stop()
    mock.stop()


def client(argv: list[str], sidecar, key: str, timeout: float = 60) -> tuple[dict, list]:
    """Run one client process against the sidecar; its JSON result and the handshakes
    the mock saw meanwhile."""
    before = len(sidecar.mock.requests)
    result = subprocess.run(argv + [f"ws://127.0.0.1:{sidecar.port}", key], capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1]), sidecar.mock.requests[before:]


def assert_secret_only(requests: list, key: str) -> None:
    """One upstream handshake, carrying the provider secret and nothing of the virtual key."""
    assert len(requests) == 1, requests
    path, headers = requests[0]
    assert path == "/v1/realtime?model=mock-realtime"
    assert headers["Authorization"] == f"Bearer {PROVIDER_SECRET}"
    assert key not in path and all(key not in v for v in headers.values())


needs_agents_venv = pytest.mark.skipif(
    not os.path.exists(AGENTS_PY), reason="run scripts/test.sh (it makes tests/agents/.venv)")


@needs_agents_venv
def test_openai_agents_realtime_session(agents_sidecar):
    key = agents_sidecar.keys.plain["good"]
    result, requests = client([AGENTS_PY, os.path.join(HERE, "agents", "openai_agents_session.py")],
                              agents_sidecar, key)
    assert result["end"] == "agent_end", result
    seen = result["seen"]
    for kind in ("session.created", "conversation.item.added", "response.created", "response.done"):
        assert f"server:{kind}" in seen, seen
    assert "error" not in seen, seen
    assert seen.index("agent_start") < seen.index("agent_end")
    assert_secret_only(requests, key)


@needs_agents_venv
def test_openai_agents_wrong_key_is_refused(agents_sidecar):
    result, requests = client([AGENTS_PY, os.path.join(HERE, "agents", "openai_agents_session.py")],
                              agents_sidecar, agents_sidecar.keys.plain["disabled"])
    assert result["close"] == [4001, "key disabled"], result
    assert requests == []


LIVEKIT = [AGENTS_PY, os.path.join(HERE, "agents", "livekit_session.py")]


def rejections(sidecar) -> list[tuple[int, str]]:
    return [(r["code"], r["reason"]) for r in sidecar.log_lines() if r.get("event") == "rejected"]


@needs_agents_venv
def test_livekit_openai_plugin_session(agents_sidecar):
    """The plugin's RealtimeSession driven without a LiveKit server: instructions, one
    generate_reply, its generation to response.done."""
    key = agents_sidecar.keys.plain["good"]
    result, requests = client(LIVEKIT, agents_sidecar, key)
    assert result["end"] == "done" and result["errors"] == [], result
    seen = result["seen"]
    assert seen[0] == "session.created" and "session.updated" in seen, seen
    assert seen.index("response.created") < seen.index("response.done"), seen
    assert_secret_only(requests, key)


@needs_agents_venv
def test_livekit_openai_plugin_wrong_key_is_refused(agents_sidecar):
    """The plugin takes the 4001 for a dropped connection and retries (each retry is
    refused again); generate_reply fails and nothing reaches the provider."""
    before = len(rejections(agents_sidecar))
    result, requests = client(LIVEKIT, agents_sidecar, agents_sidecar.keys.plain["disabled"])
    assert result["end"] == "error" and result["seen"] == [], result
    assert requests == []
    refused = rejections(agents_sidecar)[before:]
    assert refused and set(refused) == {(4001, "key disabled")}, refused


needs_node = pytest.mark.skipif(
    not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "@openai", "agents-realtime"))
    or not shutil.which("node"), reason="run `npm install --prefix tests/node`")
AGENTS_NODE = ["node", os.path.join(NODE_DIR, "agents_realtime_test.mjs")]


@needs_node
def test_node_agents_realtime_session(agents_sidecar):
    """Its websocket transport dials the `url` it is given as is: plain ws:// works,
    no TLS listener needed (unlike the openai Node SDK's OpenAIRealtimeWS)."""
    key = agents_sidecar.keys.plain["good"]
    result, requests = client(AGENTS_NODE, agents_sidecar, key)
    assert result["end"] == "agent_end", result
    seen = result["seen"]
    for kind in ("session.created", "conversation.item.added", "response.created", "response.done"):
        assert f"server:{kind}" in seen, seen
    assert not [s for s in seen if s.startswith("error")], seen
    assert seen.index("agent_start") < seen.index("agent_end")
    assert_secret_only(requests, key)


@needs_node
def test_node_agents_realtime_wrong_key_is_refused(agents_sidecar):
    """The SDK reports only a disconnect; the sidecar's log has the 4001 and why."""
    before = len(rejections(agents_sidecar))
    result, requests = client(AGENTS_NODE, agents_sidecar, agents_sidecar.keys.plain["disabled"])
    assert result["end"] == "closed" and "agent_start" not in result["seen"], result
    assert requests == []
    assert rejections(agents_sidecar)[before:] == [(4001, "key disabled")]
