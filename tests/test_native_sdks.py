"""Each provider's own SDK, unchanged but for its base URL and with a virtual key as its
API key, through the sidecar to that provider's mock (conduit_sidecar.mock): the
native paths, the native key forms, client session parameters, and usage metering."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import struct
import tempfile
import threading
import time
import urllib.parse

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import (PROVIDER_SECRET, SidecarProcess, ThreadMock, held_port, http_get, run,
                      self_signed_tls, standard_keys)

SHAPES = ("deepgram", "deepgram_agent", "gemini", "assemblyai", "elevenlabs", "azure", "openai")


@pytest.fixture(scope="module")
def native():
    """A sidecar whose built-in providers point at their mocks (same paths, loopback
    hosts), with a self-signed TLS listener for the clients that dial only wss://."""
    mocks = {shape: ThreadMock(shape) for shape in SHAPES}
    workdir = tempfile.mkdtemp(prefix="conduit-native-")
    tls_port = held_port()
    ca = os.path.join(workdir, "public", "ca.pem")
    m = {shape: f"ws://127.0.0.1:{mock.port}" for shape, mock in mocks.items()}
    keys = standard_keys()
    keys.add("gemini-flash", allowed_models=["gemini-2.5-flash*"])
    keys.add("transcribe-only", allowed_models=["gpt-4o-transcribe"])
    keys.add("public-owner", public_agents=["agent_public_demo", "agent_private_listed"],
             max_connections=1)
    keys.add("capped", max_session_seconds=1)              # test_limit_events.py
    keys.add("live-only", allowed_models=["gpt-live-*"])    # test_openai_live.py
    providers = f"""
        [providers.deepgram]
        url = "{m['deepgram']}/v1/listen?model={{model}}"
        secret_env = "PROVIDER_KEY"
        [providers.deepgram_agent]
        url = "{m['deepgram_agent']}/v1/agent/converse"
        secret_env = "PROVIDER_KEY"
        [providers.gemini]
        url = "{m['gemini']}/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent?key={{secret}}"
        secret_env = "PROVIDER_KEY"
        [providers.assemblyai]
        url = "{m['assemblyai']}/v3/ws?speech_model={{model}}"
        secret_env = "PROVIDER_KEY"
        [providers.elevenlabs]
        url = "{m['elevenlabs']}/v1/convai/conversation?agent_id={{model}}"
        secret_env = "PROVIDER_KEY"
        [providers.azure]
        url = "{m['azure']}/openai/v1/realtime?model={{model}}"
        secret_env = "PROVIDER_KEY"
        [providers.openai]
        url = "{m['openai']}/v1/realtime?model={{model}}"
        secret_env = "PROVIDER_KEY"
        models = ["gpt-realtime-translate"]
        """
    extra = self_signed_tls(tls_port, ca, os.path.join(workdir, "private"))
    # The default 10 s handshake timeout: it also bounds the wait for a first message,
    # which a client held up on a loaded machine could miss if it were short (see
    # first_message_waited).
    proc = SidecarProcess(workdir, extra + providers, keys).start()
    proc.tls_port, proc.ca_out, proc.mocks, proc.providers = tls_port, ca, mocks, providers
    yield proc
    proc.stop()
    for mock in mocks.values():
        mock.stop()


@contextlib.contextmanager
def first_message_waited(native):
    """A sidecar with `native`'s providers and keys whose handshake timeout, which
    also bounds the wait for a first message, is 2 s: for the tests that wait it out."""
    proc = SidecarProcess(tempfile.mkdtemp(prefix="conduit-native-"), native.providers, native.keys,
                          limits="handshake_timeout_seconds = 2\n").start()
    try:
        yield proc
    finally:
        proc.stop()


def metric(sidecar, name: str, **labels) -> float:
    """A sample's value from /metrics (0 when absent)."""
    _, text = http_get(sidecar.admin("/metrics"))
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"(\w+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted(m.group(2).split(","))) == want:
            return float(m.group(3))
    return 0.0


def metric_becomes(sidecar, value: float, name: str, **labels) -> float:
    """The sample once it equals `value`, or its last reading after 5 s."""
    deadline = time.monotonic() + 5
    while (got := metric(sidecar, name, **labels)) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def log_mark(sidecar) -> int:
    """How many log lines the sidecar has written: `last_session`'s `since`. Taken once
    every session it relayed has its session_end line: an earlier test's session that
    its test did not wait for (an SDK's, a node script's) would be logged after the
    mark, and `last_session` could take its line for this test's."""
    deadline = time.monotonic() + 10
    while True:
        lines = sidecar.log_lines()
        ends = sum(line.get("event") == "session_end" for line in lines)
        relayed = metric(sidecar, "conduit_connections_total", result="accepted")
        if ends >= relayed:
            return len(lines)
        assert time.monotonic() < deadline, f"{relayed:.0f} sessions relayed, {ends} session_end lines"
        time.sleep(0.05)


def last_session(sidecar, provider: str, since: int) -> dict:
    """The provider's last session-end log line after the first `since` lines. A
    session's line is written once the sidecar has seen it end, which may be after
    the client is done: wait for it (an earlier test's line is not this one)."""
    deadline = time.monotonic() + 5
    while True:
        ends = [r for r in sidecar.log_lines()[since:]
                if r.get("event") == "session_end" and r.get("provider") == provider]
        if ends:
            return ends[-1]
        assert time.monotonic() < deadline, f"no {provider} session_end line after line {since}"
        time.sleep(0.05)


# -- Deepgram ------------------------------------------------------------------------

def _deepgram_client(sidecar, key: str):
    from deepgram import AsyncDeepgramClient
    from deepgram.environment import DeepgramClientEnvironment
    base = f"127.0.0.1:{sidecar.port}"
    env = DeepgramClientEnvironment(base=f"http://{base}", production=f"ws://{base}",
                                    agent=f"ws://{base}", agent_rest=f"http://{base}")
    return AsyncDeepgramClient(api_key=key, environment=env)


async def _stream_a_second(connecting, *configures) -> list:
    """One second of 16 kHz PCM16 in 20 ms frames on the deepgram-sdk listen connection
    `connecting()` opens (after the Configure messages `configures`, if any), then
    CloseStream: the messages it got."""
    from deepgram.core.events import EventType
    got: list = []
    async with connecting() as conn:
        conn.on(EventType.MESSAGE, got.append)
        listener = asyncio.create_task(conn.start_listening())
        for configure in configures:
            await conn.send_configure(configure)
        for _ in range(50):
            await conn.send_media(bytes(640))
        await conn.send_close_stream()
        await listener
    return got


def test_deepgram_python_sdk_streams_pcm_and_gets_results(native):
    mark = log_mark(native)
    key = native.keys.plain["good"]
    client = _deepgram_client(native, key)
    before = metric(native, "conduit_usage_seconds_total", key_id="good", provider="deepgram",
                    model="nova-3", kind="audio")

    got = run(_stream_a_second(lambda: client.listen.v1.connect(
        model="nova-3", encoding="linear16", sample_rate="16000", interim_results="true",
        language_hint="en")))
    kinds = [getattr(m, "type", None) for m in got]
    assert "Results" in kinds and kinds[-1] == "Metadata", kinds
    results = [m for m in got if getattr(m, "type", None) == "Results"]
    assert "linear16/16000" in results[0].channel.alternatives[0].transcript
    assert got[-1].duration == pytest.approx(1.0)
    # The mock got the session parameters, the secret, and never the virtual key.
    path, headers = _last_request(native, "deepgram")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
    assert query == {"model": "nova-3", "encoding": "linear16", "sample_rate": "16000",
                     "interim_results": "true", "language_hint": "en"}
    assert headers["Authorization"] == f"Token {PROVIDER_SECRET}"
    assert key not in path and key not in str(headers)
    assert metric(native, "conduit_usage_seconds_total", key_id="good", provider="deepgram",
                  model="nova-3", kind="audio") == pytest.approx(before + 1.0)
    assert last_session(native, "deepgram", mark)["usage_seconds"]["audio"] == pytest.approx(1.0)


def test_deepgram_python_sdk_reconfigures_a_live_stream(native):
    """deepgram-sdk's send_configure (7.13: Nova-3 keyterms and formatting features
    mid-stream) goes through, and its ConfigureSuccess comes back."""
    from deepgram.listen.v1.types import ListenV1Configure
    client = _deepgram_client(native, native.keys.plain["good"])

    got = run(_stream_a_second(
        lambda: client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate="16000"),
        ListenV1Configure(keyterms=["Deepgram", "customer service"], features={"numerals": True})))
    kinds = [getattr(m, "type", None) for m in got]
    assert kinds[0] == "ConfigureSuccess" and kinds[-1] == "Metadata", kinds
    assert got[0].keyterms == ["Deepgram", "customer service"]


def _last_request(sidecar, shape):
    """(path, headers) of the last request a mock received."""
    return sidecar.mocks[shape].last_request()


@pytest.mark.parametrize("key", ["condt_wrong", None])
def test_deepgram_wrong_or_missing_key_gets_4001(native, key):
    async def body():
        headers = {"Authorization": f"Token {key}"} if key else {}
        async with connect(f"ws://127.0.0.1:{native.port}/v1/listen?model=nova-3",
                           additional_headers=headers) as ws:
            with pytest.raises(ConnectionClosed) as exc:
                await ws.recv()
        return exc.value.rcvd
    rcvd = run(body())
    assert (rcvd.code, rcvd.reason) == (4001, "unknown key" if key else "missing key")


def test_deepgram_audio_format_given_twice_is_refused_and_repeatable_parameters_pass(native):
    """`sample_rate=8000&sample_rate=48000`: both went to Deepgram while the sidecar
    counted the session's audio seconds at the last; a provider reading the first would
    make them a sixth of the audio's. Refused at the handshake; keyterm repeats."""
    key = native.keys.plain["good"]
    base = f"ws://127.0.0.1:{native.port}/v1/listen?model=nova-3&encoding=mulaw"
    requests = native.mocks["deepgram"].mock.requests
    seen = len(requests)

    async def refused():
        with pytest.raises(InvalidStatus) as exc:
            async with connect(base + "&sample_rate=8000&sample_rate=48000", subprotocols=["token", key]):
                pass
        return exc.value.response

    response = run(refused())
    assert response.status_code == 400 and response.body.decode() == "sample_rate given more than once\n"
    assert len(requests) == seen                              # nothing went upstream

    async def repeated():
        async with connect(base + "&sample_rate=8000&keyterm=alpha&keyterm=beta",
                           subprotocols=["token", key]) as ws:
            await ws.send(bytes(4000))
            return await ws.recv()

    assert "mulaw/8000" in run(repeated())
    path, _ = _last_request(native, "deepgram")
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["keyterm"] == ["alpha", "beta"]


def test_deepgram_browser_subprotocol_form(native):
    key = native.keys.plain["good"]

    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}/v1/listen?model=nova-3&encoding=linear16"
                           "&sample_rate=8000", subprotocols=["token", key]) as ws:
            assert ws.subprotocol == "token"                  # never the key
            await ws.send(bytes(8000))
            assert "linear16/8000" in await ws.recv()
    run(body())


# -- Gemini Live ---------------------------------------------------------------------

@pytest.fixture
def sidecar_ca_bundle(native, tmp_path, monkeypatch):
    """What the README tells Python apps to do: SSL_CERT_FILE replaces Python's default
    trust store (and google-genai's certifi one), so it is certifi's bundle plus the
    sidecar's CA; the app's other TLS hosts keep verifying against certifi's roots."""
    import certifi
    bundle = tmp_path / "bundle.pem"
    with open(certifi.where(), "rb") as roots, open(native.ca_out, "rb") as ca:
        bundle.write_bytes(roots.read() + b"\n" + ca.read())
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    return str(bundle)


def _gemini(native, key_id: str):
    from google import genai
    return genai.Client(api_key=native.keys.plain[key_id],
                        http_options={"base_url": f"https://127.0.0.1:{native.tls_port}",
                                      "api_version": "v1"})


def test_gemini_python_sdk_over_the_tls_listener(native, sidecar_ca_bundle):
    mark = log_mark(native)
    client = _gemini(native, "gemini-flash")
    # Other tests here meter sessions of the same key and model: this one's is the growth.
    labels = dict(key_id="gemini-flash", provider="gemini", model="gemini-2.5-flash-live")
    before = [metric(native, "conduit_usage_tokens_total", kind=kind, **labels)
              for kind in ("input", "output_text")]

    async def body():
        texts, done = [], False
        async with client.aio.live.connect(model="gemini-2.5-flash-live",
                                           config={"response_modalities": ["TEXT"]}) as session:
            await session.send_client_content(
                turns={"role": "user", "parts": [{"text": "hello there"}]}, turn_complete=True)
            async for message in session.receive():
                if message.text:
                    texts.append(message.text)
                if message.server_content and message.server_content.turn_complete:
                    done = True
        return texts, done

    texts, done = run(body())
    assert texts == ["echo: hello there"] and done
    path, headers = _last_request(native, "gemini")
    key = native.keys.plain["gemini-flash"]
    # The API version the client asked for (v1; the template says v1beta) is kept.
    assert path == ("/ws/google.ai.generativelanguage.v1.GenerativeService.BidiGenerateContent"
                    "?key=" + urllib.parse.quote(PROVIDER_SECRET, safe=""))
    assert key not in path and key not in str(headers) and "x-goog-api-key" not in headers
    assert last_session(native, "gemini", mark)["model"] == "gemini-2.5-flash-live"
    # usageMetadata comes in a binary frame, after serverContent: metered all the same.
    assert [metric(native, "conduit_usage_tokens_total", kind=kind, **labels)
            for kind in ("input", "output_text")] == [before[0] + 5, before[1] + 3]


def test_gemini_usage_bundled_after_the_turns_audio_is_metered(native, sidecar_ca_bundle):
    """Gemini 3.x Live sends a turn's audio, turnComplete and usageMetadata in one
    message, usageMetadata last (proto field order): past the first 8 KiB the relay
    sniffed, so the turn's tokens were never counted and budgets never grew."""
    mark = log_mark(native)
    client = _gemini(native, "gemini-flash")

    async def body():
        audio = 0
        async with client.aio.live.connect(model="gemini-2.5-flash-live",
                                           config={"response_modalities": ["AUDIO"]}) as session:
            await session.send_client_content(
                turns={"role": "user", "parts": [{"text": "one two three four"}]}, turn_complete=True)
            async for message in session.receive():
                audio += len(message.data or b"")
                if message.server_content and message.server_content.turn_complete:
                    break
        return audio

    assert run(body()) == 96000                                 # 2 s of 24 kHz PCM16
    tokens = last_session(native, "gemini", mark)["usage_tokens"]
    assert (tokens["input"], tokens["output"], tokens["output_audio"]) == (7, 64, 64)


def test_gemini_on_vertex_meters_its_candidates_tokens(native):
    """Vertex AI's Live API names a turn's output `candidatesTokenCount` and
    `candidatesTokensDetails` (google.cloud.aiplatform.v1 UsageMetadata; google-genai
    3.6.1's `_live_converters._UsageMetadata_from_vertex` reads them into
    response_token_count and response_tokens_details), where AI Studio's say
    `responseTokenCount`: a `gemini` provider pointed at Vertex had its output tokens
    counted as 0, in tokens and cost."""
    vertex = "/ws/google.cloud.aiplatform.v1beta1.LlmBidiService/BidiGenerateContent"
    providers = f"""
        [providers.gemini]
        url = "ws://127.0.0.1:{native.mocks['gemini'].port}{vertex}"
        headers = {{ Authorization = "Bearer {{secret}}" }}
        secret_env = "PROVIDER_KEY"
        """
    sidecar = SidecarProcess(tempfile.mkdtemp(prefix="conduit-vertex-"), providers, standard_keys()).start()
    try:
        mark = log_mark(sidecar)

        async def body():
            url = f"ws://127.0.0.1:{sidecar.port}{GEMINI_PATH}"
            async with connect(url, additional_headers={"x-goog-api-key": sidecar.keys.plain["good"]}) as ws:
                await ws.send(json.dumps({"setup": {"model": "models/gemini-live-2.5-flash",
                                                    "generationConfig": {"responseModalities": ["AUDIO"]}}}))
                await ws.recv()
                await ws.send(json.dumps({"clientContent": {
                    "turns": [{"role": "user", "parts": [{"text": "one two three four"}]}], "turnComplete": True}}))
                assert b'"candidatesTokenCount"' in await ws.recv()
        run(body())
        tokens = last_session(sidecar, "gemini", mark)["usage_tokens"]
        assert (tokens["input"], tokens["output"], tokens["output_audio"]) == (7, 64, 64)
    finally:
        sidecar.stop()


def test_gemini_disallowed_model_in_setup_gets_4003(native, sidecar_ca_bundle):
    from google.genai import errors
    client = _gemini(native, "gemini-flash")

    async def body():
        async with client.aio.live.connect(model="gemini-2.5-pro-live", config={}):
            pass
    with pytest.raises(errors.APIError) as exc:
        run(body())
    assert exc.value.code == 4003
    assert "gemini-2.5-pro-live" in str(exc.value) and "not allowed" in str(exc.value)


# -- Node SDKs -----------------------------------------------------------------------

NODE_DIR = os.path.join(os.path.dirname(__file__), "node")


def node(script: str, *args: str) -> dict:
    if not shutil.which("node") or not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "@google")):
        pytest.skip("run `npm install --prefix tests/node` (scripts/test.sh does)")
    result = subprocess.run(["node", os.path.join(NODE_DIR, script), *args], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


def test_gemini_node_sdk(native):
    out = node("gemini_live_test.mjs", f"http://127.0.0.1:{native.port}",
               native.keys.plain["gemini-flash"], "gemini-2.5-flash-live", "v1alpha")
    assert out["texts"] == ["echo: hello node"] and out["turnComplete"], out
    path, headers = _last_request(native, "gemini")
    # Node dials `//ws/...` with ?key=: the version it asked for is kept, the key replaced.
    assert path == ("/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContent"
                    "?key=" + urllib.parse.quote(PROVIDER_SECRET, safe=""))
    assert native.keys.plain["gemini-flash"] not in str(headers)


def test_gemini_node_sdk_disallowed_model_gets_4003(native):
    out = node("gemini_live_test.mjs", f"http://127.0.0.1:{native.port}",
               native.keys.plain["gemini-flash"], "gemini-2.5-pro-live")
    assert out["close"][0] == 4003 and "not allowed" in out["close"][1], out
    assert not out["texts"]


def test_deepgram_node_sdk(native):
    out = node("deepgram_test.mjs", f"ws://127.0.0.1:{native.port}", native.keys.plain["good"])
    assert "Results" in out["types"] and out["types"][-1] == "Metadata", out
    assert "linear16/16000" in out["transcripts"][0] and out["duration"] == pytest.approx(1.0)
    path, _ = _last_request(native, "deepgram")
    assert "encoding=linear16" in path and "sample_rate=16000" in path


def test_deepgram_node_sdk_wrong_key_gets_4001(native):
    out = node("deepgram_test.mjs", f"ws://127.0.0.1:{native.port}", "condt_wrong")
    assert out["close"] == [4001, "unknown key"], out


# -- AssemblyAI ----------------------------------------------------------------------

def test_assemblyai_streaming_client_v3(native):
    from assemblyai.streaming.v3 import (StreamingClient, StreamingClientOptions, StreamingEvents,
                                         StreamingParameters)
    key = native.keys.plain["good"]
    events = []
    client = StreamingClient(StreamingClientOptions(api_key=key,
                                                    api_host=f"ws://127.0.0.1:{native.port}"))
    for kind in (StreamingEvents.Begin, StreamingEvents.Turn, StreamingEvents.Termination,
                 StreamingEvents.Error):
        client.on(kind, lambda _, event, kind=kind: events.append((kind, event)))
    client.connect(StreamingParameters(sample_rate=16000, speech_model="u3-rt-pro",
                                       format_turns=True, customer_support_audio_capture=True))
    client.stream(bytes(3200) for _ in range(20))           # 2 s of 16 kHz PCM16
    client.disconnect(terminate=True)
    kinds = [k for k, _ in events]
    assert kinds[0] == StreamingEvents.Begin and StreamingEvents.Turn in kinds, events
    assert kinds[-1] == StreamingEvents.Termination and events[-1][1].audio_duration_seconds == 2
    path, headers = _last_request(native, "assemblyai")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
    # Not customer_support_audio_capture: what AssemblyAI keeps is the operator's choice.
    assert query == {"speech_model": "u3-rt-pro", "sample_rate": "16000", "format_turns": "True"}
    assert headers["Authorization"] == PROVIDER_SECRET and key not in str(headers)
    assert metric_becomes(native, 2.0, "conduit_usage_seconds_total", key_id="good", provider="assemblyai",
                          model="u3-rt-pro", kind="audio") == 2.0


def test_assemblyai_token_in_the_query(native):
    async def body():
        url = f"ws://127.0.0.1:{native.port}/v3/ws?speech_model=u3-rt-pro&sample_rate=8000&token="
        async with connect(url + native.keys.plain["good"]) as ws:
            assert '"Begin"' in await ws.recv()
        async with connect(url + "condt_wrong") as ws:
            with pytest.raises(ConnectionClosed) as exc:
                await ws.recv()
        return exc.value.rcvd
    assert run(body()).code == 4001
    path, _ = _last_request(native, "assemblyai")
    assert "token" not in path and "sample_rate=8000" in path


# -- ElevenLabs ----------------------------------------------------------------------

def _conversation(native, key: str, agent: str, requires_auth: bool):
    """An ElevenLabs SDK text conversation: one user message, the agent's answer."""
    from elevenlabs.client import ElevenLabs
    from elevenlabs.conversational_ai.conversation import Conversation
    answered, ended = threading.Event(), threading.Event()
    replies = []
    client = ElevenLabs(api_key=key, base_url=f"http://127.0.0.1:{native.port}")
    conv = Conversation(client, agent, requires_auth=requires_auth,
                        callback_agent_response=lambda text: (replies.append(text), answered.set()),
                        callback_end_session=ended.set)
    conv.start_session()
    deadline = time.monotonic() + 10
    while conv._conversation_id is None and not ended.is_set() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not ended.is_set():
        conv.send_user_message("hello agent")
        answered.wait(10)
    conv.end_session()
    conv.wait_for_session_end()
    return replies


def test_elevenlabs_private_agent_through_a_signed_url(native):
    mark = log_mark(native)
    key = native.keys.plain["good"]
    replies = _conversation(native, key, "agent_private", requires_auth=True)
    assert replies == ["echo: hello agent"]
    mock = native.mocks["elevenlabs"].mock
    rest = [(p, h) for p, h in mock.requests if "get-signed-url" in p][-1]
    assert rest[1]["xi-api-key"] == PROVIDER_SECRET and key not in str(rest[1])
    path, headers = mock.requests[-1]
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
    assert query["agent_id"] == "agent_private" and query["conversation_signature"]
    assert headers["xi-api-key"] == PROVIDER_SECRET and key not in path + str(headers)
    end = last_session(native, "elevenlabs", mark)
    assert end["key_id"] == "good" and end["provider"] == "elevenlabs" and end["model"] == "agent_private"


def test_elevenlabs_signed_url_is_refused_for_a_bad_key_and_unknown_signatures(native):
    status, body = http_get(f"http://127.0.0.1:{native.port}/v1/convai/conversation/"
                            "get-signed-url?agent_id=a")
    assert status == 401 and "missing key" in body
    # Bad input before the key check gets its 400, not a dropped connection.
    status, body = http_get(f"http://127.0.0.1:{native.port}/v1/convai/conversation/get-signed-url")
    assert status == 400 and "agent_id is required" in body

    async def body():
        url = (f"ws://127.0.0.1:{native.port}/v1/convai/conversation?agent_id=a"
               "&conversation_signature=forged")
        async with connect(url) as ws:
            with pytest.raises(ConnectionClosed) as exc:
                await ws.recv()
        return exc.value.rcvd
    rcvd = run(body())
    assert (rcvd.code, rcvd.reason) == (4001, "unknown or expired signed URL")


def test_elevenlabs_public_agent_without_any_credential(native):
    """requires_auth=False: the SDK sends no credential. The agent is listed as public by
    the key `public-owner`, so the session is that key's, and goes upstream without the
    provider secret."""
    mark = log_mark(native)
    other = native.keys.plain["good"]            # the SDK's api_key: never sent on this path
    replies = _conversation(native, other, "agent_public_demo", requires_auth=False)
    assert replies == ["echo: hello agent"]
    path, headers = _last_request(native, "elevenlabs")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
    assert query["agent_id"] == "agent_public_demo" and query["source"] == "python_sdk"
    assert "xi-api-key" not in headers and PROVIDER_SECRET not in path + str(headers)
    assert other not in path + str(headers)
    end = last_session(native, "elevenlabs", mark)
    assert (end["key_id"], end["model"]) == ("public-owner", "agent_public_demo")


def test_elevenlabs_public_agent_sessions_obey_the_owning_keys_limits(native):
    url = f"ws://127.0.0.1:{native.port}/v1/convai/conversation?agent_id=agent_public_demo"

    async def body():
        async with connect(url) as first:
            await first.send('{"type":"conversation_initiation_client_data"}')
            assert "conversation_initiation_metadata" in await first.recv()
            async with connect(url) as second:          # public-owner: max_connections = 1
                with pytest.raises(ConnectionClosed) as exc:
                    await second.recv()
        return exc.value.rcvd
    rcvd = run(body())
    assert rcvd.code == 4029 and "key limit" in rcvd.reason


def test_elevenlabs_unlisted_agent_without_a_key_gets_4001(native):
    before = metric(native, "conduit_auth_failures_total", reason="missing")
    replies = _conversation(native, native.keys.plain["good"], "agent_public_unlisted",
                            requires_auth=False)
    assert not replies
    assert metric(native, "conduit_auth_failures_total", reason="missing") == before + 1
    assert _closed_with(native, "/v1/convai/conversation?agent_id=agent_public_unlisted") == (
        4001, "missing key")


def test_elevenlabs_listed_agent_that_is_private_is_refused_without_resting_the_deployment(native):
    """The provider refuses a key-less private agent (listed as public by mistake): the
    client gets the refusal, and the deployment, which is fine, is not rested."""
    code, reason = _closed_with(native, "/v1/convai/conversation?agent_id=agent_private_listed")
    assert (code, reason) == (1014, "upstream refused: HTTP 403")
    assert metric(native, "conduit_deployment_healthy", provider="elevenlabs", deployment="0") == 1
    _, headers = _last_request(native, "elevenlabs")
    assert "xi-api-key" not in headers


def test_elevenlabs_key_header_works_for_any_agent(native):
    key = native.keys.plain["good"]

    async def body():         # the SDK's own key form, xi-api-key, with the secret upstream
        async with connect(f"ws://127.0.0.1:{native.port}/v1/convai/conversation?agent_id=agent_x",
                           additional_headers={"xi-api-key": key}) as ws:
            await ws.send('{"type":"conversation_initiation_client_data"}')
            assert "conversation_initiation_metadata" in await ws.recv()
    run(body())
    assert _last_request(native, "elevenlabs")[1]["xi-api-key"] == PROVIDER_SECRET


def test_signed_urls_are_remembered_briefly_and_boundedly():
    from conduit_sidecar.signed_urls import SignedUrls
    now = [0.0]
    urls = SignedUrls(size=2, ttl=60, clock=lambda: now[0])
    for n in range(3):
        urls.remember(f"sig{n}", f"key{n}", f"deployment{n}")
    assert urls.issued_to("sig0") is None                   # the least recent went first
    assert urls.issued_to("sig2") == ("key2", "deployment2")
    now[0] = 61
    assert urls.issued_to("sig1") is None and len(urls.issued) == 1


# -- Azure OpenAI --------------------------------------------------------------------

def test_azure_openai_client_realtime_over_the_tls_listener(native, sidecar_ca_bundle):
    """AzureOpenAI dials only wss://, on the legacy `/openai/realtime?api-version=..&
    deployment=..` path with the key in `api-key`; upstream it becomes the GA path."""
    import base64
    from openai import AsyncAzureOpenAI
    key = native.keys.plain["good"]
    client = AsyncAzureOpenAI(azure_endpoint=f"https://127.0.0.1:{native.tls_port}", api_key=key,
                              api_version="2025-04-01-preview")
    labels = dict(key_id="good", provider="azure", model="my-realtime")
    before = metric(native, "conduit_usage_tokens_total", kind="input_audio", **labels)

    async def body():
        async with client.realtime.connect(model="my-realtime") as conn:
            assert (await conn.recv()).type == "session.created"
            await conn.input_audio_buffer.append(audio=base64.b64encode(bytes(48000)).decode())
            await conn.input_audio_buffer.commit()
            async for event in conn:
                if event.type == "response.done":
                    return event.response.usage.input_token_details.audio_tokens
    assert run(body()) == 10
    path, headers = _last_request(native, "azure")
    assert path == "/openai/v1/realtime?model=my-realtime"
    assert headers["api-key"] == PROVIDER_SECRET and key not in str(headers)
    assert metric_becomes(native, before + 10, "conduit_usage_tokens_total", kind="input_audio",
                          **labels) == before + 10



# -- OpenAI sessions that name no model in the URL -------------------------------------

def _openai(native, key_id: str):
    from openai import AsyncOpenAI
    return AsyncOpenAI(base_url=f"http://127.0.0.1:{native.port}/v1",
                       api_key=native.keys.plain[key_id])


def _transcribe(native, key_id: str, model: str | None, seconds: int = 1, url_model: str | None = None):
    """A transcription session through the openai SDK (`intent=transcription`, no model
    in the URL unless `url_model`; the GA session.update names the model): the completed
    event, or the close code and reason."""
    import base64

    from openai import APIError

    async def body():
        session = {"type": "transcription"}
        if model is not None:
            session["audio"] = {"input": {"transcription": {"model": model}}}
        try:
            async with _openai(native, key_id).realtime.connect(
                    extra_query={"intent": "transcription", **({"model": url_model} if url_model else {})}) as conn:
                await conn.session.update(session=session)
                await conn.input_audio_buffer.append(audio=base64.b64encode(bytes(48000 * seconds)).decode())
                await conn.input_audio_buffer.commit()
                async for event in conn:
                    if event.type == "conversation.item.input_audio_transcription.completed":
                        return event
        except (ConnectionClosed, APIError) as exc:
            rcvd = getattr(exc, "rcvd", None) or getattr(exc.__cause__, "rcvd", None)
            return rcvd.code, rcvd.reason
    return run(body())


def _transcribe_then_update(native, later: dict):
    """A transcription session through the openai SDK that names gpt-4o-transcribe,
    then sends `later` as a second session.update, then audio: the transcript or the
    close code and reason, and the transcription models of the provider's
    session.updated echoes (what reached it)."""
    import base64

    from openai import APIError

    echoed = []

    async def body():
        try:
            async with _openai(native, "transcribe-only").realtime.connect(
                    extra_query={"intent": "transcription"}) as conn:
                await conn.session.update(session={
                    "type": "transcription", "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}})
                await conn.session.update(session=later)
                await conn.input_audio_buffer.append(audio=base64.b64encode(bytes(48000)).decode())
                await conn.input_audio_buffer.commit()
                async for event in conn:
                    if event.type == "session.updated":
                        echoed.append(event.session.audio.input.transcription.model)
                    if event.type == "conversation.item.input_audio_transcription.completed":
                        return event.transcript
        except (ConnectionClosed, APIError) as exc:
            rcvd = getattr(exc, "rcvd", None) or getattr(exc.__cause__, "rcvd", None)
            return rcvd.code, rcvd.reason
    return run(body()), echoed


@pytest.mark.parametrize("later,outcome", [
    ({"audio": {"input": {"transcription": {"model": "whisper-1"}}}},
     (4003, "model 'whisper-1' not allowed for this key")),
    # Without the session's type, which OpenAI may take as leaving it unchanged.
    ({"type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1"}}}},
     (4003, "model 'whisper-1' not allowed for this key")),
    # The beta shape, or a session model, in a GA update: in case OpenAI takes them.
    ({"input_audio_transcription": {"model": "whisper-1"}}, (4003, "model 'whisper-1' not allowed for this key")),
    ({"type": "realtime", "model": "whisper-1"}, (4003, "model 'whisper-1' not allowed for this key")),
    ({"audio": {"input": {"transcription": {"model": "gpt-4o-transcribe", "Model": "whisper-1"}}}},
     (1002, "a later message spells 'model' in another case")),
])
def test_openai_transcription_later_update_is_checked_too(native, later, outcome):
    """Messages after the held first one were relayed unread: a second session.update
    switched the session to a model the key may not use. Each later text message of
    such a session is now read whole and withheld until read: one naming a model the
    key may not use ends the session and never reaches the provider."""
    result, echoed = _transcribe_then_update(native, later)
    assert result == outcome
    assert "whisper-1" not in echoed and set(echoed) <= {"gpt-4o-transcribe"}


def test_openai_transcription_model_that_is_a_virtual_key_is_not_logged(native):
    """A virtual key sent as the transcription model, in the first session.update or a
    later one, was refused with the model in the reason: the key was logged (and, for
    a key without allowed_models, became the session's model label). Refused now as a
    virtual key in the message, as a Live session's is."""
    key = native.keys.plain["good"]
    mark = log_mark(native)
    assert _transcribe(native, "transcribe-only", key) == (4003, "a virtual key in the first message")
    result, echoed = _transcribe_then_update(native, {"audio": {"input": {"transcription": {"model": key}}}})
    assert result == (4003, "a virtual key in a later message") and key not in echoed
    assert last_session(native, "openai", mark)["model"] == "gpt-4o-transcribe"
    assert not [line for line in native.log_lines()[mark:] if key in json.dumps(line)]


def test_openai_transcription_later_update_allowed_goes_on(native):
    """An allowed later update is relayed (read whole first), and the audio after it."""
    same = {"type": "transcription", "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}}
    assert _transcribe_then_update(native, same) == (
        "48000 bytes heard by gpt-4o-transcribe", ["gpt-4o-transcribe", "gpt-4o-transcribe"])


def test_openai_transcription_session_through_the_sdk(native):
    mark = log_mark(native)
    labels = dict(key_id="transcribe-only", provider="openai", model="gpt-4o-transcribe")
    before = metric(native, "conduit_usage_tokens_total", kind="input_audio", **labels)
    event = _transcribe(native, "transcribe-only", "gpt-4o-transcribe")
    assert event.transcript == "48000 bytes heard by gpt-4o-transcribe"
    assert (event.usage.type, event.usage.input_tokens) == ("tokens", 10)
    path, headers = _last_request(native, "openai")
    assert path == "/v1/realtime?intent=transcription"           # no model= upstream
    key = native.keys.plain["transcribe-only"]
    assert headers["Authorization"] == f"Bearer {PROVIDER_SECRET}" and key not in str(headers)
    assert metric_becomes(native, before + 10, "conduit_usage_tokens_total", kind="input_audio",
                          **labels) == before + 10
    assert metric(native, "conduit_usage_tokens_total", kind="input", **labels) >= 10
    assert last_session(native, "openai", mark)["model"] == "gpt-4o-transcribe"


def test_openai_transcription_billed_by_duration(native):
    labels = dict(key_id="good", provider="openai", model="whisper-1", kind="audio")
    before = metric(native, "conduit_usage_seconds_total", **labels)
    event = _transcribe(native, "good", "whisper-1", seconds=2)
    assert (event.usage.type, event.usage.seconds) == ("duration", 2.0)
    assert metric_becomes(native, before + 2.0, "conduit_usage_seconds_total", **labels) == before + 2.0


def test_openai_transcription_model_not_allowed_gets_4003(native):
    assert _transcribe(native, "transcribe-only", "whisper-1") == (
        4003, "model 'whisper-1' not allowed for this key")


def test_openai_transcription_without_a_model(native):
    """Naming no model is fine for a key that allows any model (label `transcription`),
    not for a key limited to some."""
    mark = log_mark(native)
    assert _transcribe(native, "transcribe-only", None) == (
        4003, "the first message must name a model for this key")
    event = _transcribe(native, "good", None)
    assert event.transcript == "48000 bytes heard by no model"
    assert last_session(native, "openai", mark)["model"] == "transcription"


def test_openai_transcription_with_a_model_in_the_url_too(native):
    """LiveKit's OpenAI STT plugin names its model in the URL beside intent=transcription
    when its base URL is not OpenAI's ("Gateways need the model on the upgrade URL"); at
    OpenAI, `model=` makes a conversation session, which refuses the transcription update.
    So none goes upstream, and the update's model is the one checked and labelled."""
    mark = log_mark(native)
    event = _transcribe(native, "transcribe-only", "gpt-4o-transcribe", url_model="gpt-4o-transcribe")
    assert event.transcript == "48000 bytes heard by gpt-4o-transcribe"
    assert _last_request(native, "openai")[0] == "/v1/realtime?intent=transcription"
    assert last_session(native, "openai", mark)["model"] == "gpt-4o-transcribe"
    assert _transcribe(native, "transcribe-only", "whisper-1", url_model="gpt-4o-transcribe") == (
        4003, "model 'whisper-1' not allowed for this key")
    assert _transcribe(native, "transcribe-only", None, url_model="gpt-4o-transcribe") == (
        4003, "the first message must name a model for this key")


def test_openai_beta_transcription_session_update(native):
    """The beta shape names the model in `transcription_session.update`."""
    key = native.keys.plain["transcribe-only"]
    update = json.dumps({"type": "transcription_session.update",
                         "session": {"input_audio_transcription": {"model": "gpt-4o-transcribe"}}})

    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}/v1/realtime?intent=transcription",
                           additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            await ws.send(update)
            kinds = [json.loads(await ws.recv())["type"] for _ in range(2)]
        denied = update.replace("gpt-4o-transcribe", "whisper-1")
        async with connect(f"ws://127.0.0.1:{native.port}/v1/realtime?intent=transcription",
                           subprotocols=["realtime", f"openai-insecure-api-key.{key}"]) as ws:
            await ws.send(denied)
            with pytest.raises(ConnectionClosed) as exc:
                await ws.recv()
        return kinds, exc.value.rcvd
    kinds, rcvd = run(body())
    assert kinds == ["session.created", "transcription_session.updated"]
    assert rcvd.code == 4003


def test_openai_call_id_session_through_the_sdk(native):
    mark = log_mark(native)
    async def body():
        async with _openai(native, "good").realtime.connect(call_id="rtc_abc 1") as conn:
            return (await conn.recv()).type
    assert run(body()) == "session.created"
    path, headers = _last_request(native, "openai")
    assert path == "/v1/realtime?call_id=rtc_abc%201"
    assert headers["Authorization"] == f"Bearer {PROVIDER_SECRET}"
    end = last_session(native, "openai", mark)
    assert (end["key_id"], end["model"]) == ("good", "call")


def test_openai_call_id_with_a_key_limited_to_models_gets_4003(native):
    from openai import APIError

    async def body():
        try:
            async with _openai(native, "models-only").realtime.connect(call_id="rtc_abc") as conn:
                await conn.recv()
        except (ConnectionClosed, APIError) as exc:
            rcvd = getattr(exc, "rcvd", None) or getattr(exc.__cause__, "rcvd", None)
            return rcvd.code, rcvd.reason
    assert run(body()) == (4003, "call_id sessions name no model: not allowed for this key")


def test_openai_call_id_with_a_model_is_still_a_call(native):
    """openai-python sends `model` and `call_id` both when given both (openai-agents and
    the Node SDK refuse them together): the session is still the call, whose model was
    chosen where it was created. A key limited to models gets 4003 as without the model
    (which it would otherwise pass, joining any call), and a call goes upstream as one."""
    from openai import APIError

    async def body(key_id):
        try:
            async with _openai(native, key_id).realtime.connect(call_id="rtc_abc", model="gpt-realtime-translate") as conn:
                return (await conn.recv()).type
        except (ConnectionClosed, APIError) as exc:
            rcvd = getattr(exc, "rcvd", None) or getattr(exc.__cause__, "rcvd", None)
            return rcvd.code, rcvd.reason
    assert run(body("models-only")) == (4003, "call_id sessions name no model: not allowed for this key")
    mark = log_mark(native)
    assert run(body("good")) == "session.created"
    assert _last_request(native, "openai")[0] == "/v1/realtime?call_id=rtc_abc"
    assert last_session(native, "openai", mark)["model"] == "call"


# -- OpenAI translation sessions -----------------------------------------------------

def _translate(native, key_id: str, **query) -> tuple[str, list[str]] | tuple[int, str]:
    """A translation session through the openai SDK (realtime.translations.connect):
    (the session's model, the event types after session.created), or the close code
    and reason."""
    import base64

    from openai import APIError

    async def body():
        try:
            async with _openai(native, key_id).realtime.translations.connect(
                    model="gpt-realtime-translate", extra_query=query) as conn:
                created = await conn.recv()
                assert (created.type, created.session.type) == ("session.created", "translation")
                await conn.session.update(session={"audio": {"output": {"language": "es"}}})
                audio = base64.b64encode(bytes(9600)).decode()
                await conn.session.input_audio_buffer.append(audio=audio)
                await conn.session.close()
                return created.session.model, [e.type for e in await _until_closed(conn, audio)]
        except (ConnectionClosed, APIError) as exc:
            return _close_of(exc)
    return run(body())


async def _until_closed(conn, audio: str) -> list:
    """The events an openai SDK connection gets until `session.closed`; the audio
    deltas among them must be `audio` (the mock sends it back)."""
    seen = []
    async for event in conn:
        seen.append(event)
        if event.type == "session.output_audio.delta":
            assert event.delta == audio
        if event.type == "session.closed":
            return seen
    raise AssertionError(f"no session.closed after {[e.type for e in seen]}")


def _close_of(exc: BaseException) -> tuple[int, str]:
    """The close code and reason an openai SDK error came from (it wraps websockets')."""
    rcvd = getattr(exc, "rcvd", None) or getattr(exc.__cause__, "rcvd", None)
    return rcvd.code, rcvd.reason


def test_openai_translation_session_through_the_sdk(native):
    """/v1/realtime/translations?model=M goes to the template's /realtime path with
    /translations after it, with the provider secret and the model as given."""
    mark = log_mark(native)
    assert _translate(native, "good") == (
        "gpt-realtime-translate", ["session.updated", "session.output_audio.delta", "session.closed"])
    path, headers = _last_request(native, "openai")
    assert path == "/v1/realtime/translations?model=gpt-realtime-translate"
    assert headers["Authorization"] == f"Bearer {PROVIDER_SECRET}"
    assert native.keys.plain["good"] not in str(headers)
    end = last_session(native, "openai", mark)
    assert (end["key_id"], end["model"]) == ("good", "gpt-realtime-translate")


def test_openai_translation_session_policy(native):
    """allowed_models is checked against the URL's model (4003); Azure documents no
    translation path (4004)."""
    assert _translate(native, "transcribe-only") == (
        4003, "model 'gpt-realtime-translate' not allowed for this key")
    assert _translate(native, "good", provider="azure") == (
        4004, "provider 'azure' does not serve /v1/realtime/translations")


# -- bad input on the native paths ---------------------------------------------------

GEMINI_PATH = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"


def _closed_with(native, path: str, headers: dict | None = None, send=None) -> tuple[int, str]:
    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}{path}",
                           additional_headers=headers or {}) as ws:
            if send is not None:
                await ws.send(send)
            with pytest.raises(ConnectionClosed) as exc:
                await ws.recv()
        return exc.value.rcvd.code, exc.value.rcvd.reason
    return run(body())


@pytest.mark.parametrize("first,reason", [
    ('{"clientContent": {}}', "the first message must be a setup message naming the model"),
    ("not json", "the first message must be a setup message naming the model"),
    ('{"setup": {"model": ""}}', "setup names no valid model"),
    # A name no model has, as long as a message may be: it would go into the log lines.
    ('{"setup": {"model": "models/%s"}}' % ("m" * 100_000), "setup names no valid model"),
    # Nested deeper than a parser recurses (msgspec raises RecursionError, not DecodeError).
    ('{"setup": {"model": "models/gemini-x", "x": %s}}' % ("[" * 100_000 + "]" * 100_000),
     "the first message must be a setup message naming the model"),
])
def test_gemini_first_message_must_be_a_setup(native, first, reason):
    key = native.keys.plain["good"]
    assert _closed_with(native, f"{GEMINI_PATH}?key={key}", send=first) == (1002, reason)


@pytest.mark.parametrize("query", ["provider=gemini", "provider=gemini&model=gpt-realtime-x"])
def test_gemini_setup_is_checked_on_the_sidecars_own_path_too(native, query):
    """A key whose allowed_models lists no Gemini model, on /v1/realtime/connect: the
    setup message is held and its model checked there too (4003). It was held only
    on Gemini's own path, and went through unchecked here."""
    key = native.keys.plain["models-only"]
    setup = '{"setup": {"model": "models/gemini-live"}}'
    assert _closed_with(native, f"/v1/realtime/connect?{query}", {"Authorization": f"Bearer {key}"},
                        send=setup) == (4003, "model 'gemini-live' not allowed for this key")


TWICE = "the first message names a member twice"


@pytest.mark.parametrize("first,reason", [
    ('{"setup": {"model": "models/gemini-2.5-pro", "model": "models/gemini-2.5-flash"}}', TWICE),
    ('{"setup": {"model": "models/gemini-2.5-pro"}, "setup": {"model": "models/gemini-2.5-flash"}}', TWICE),
    ('{"setup": {"mod\\u0065l": "models/gemini-2.5-pro", "model": "models/gemini-2.5-flash"}}', TWICE),
    ('{"setup": {"Model": "models/gemini-2.5-pro", "model": "models/gemini-2.5-flash"}}',
     "the first message spells 'model' in another case"),
    ('{"SETUP": {"model": "models/gemini-2.5-pro"}, "setup": {"model": "models/gemini-2.5-flash"}}',
     "the first message spells 'setup' in another case"),
])
def test_gemini_setup_a_provider_could_read_otherwise_is_refused(native, first, reason):
    """msgspec keeps the last of a member named twice and skips a name in another case;
    the provider's parser may keep the first, or read `Model` (Go's does): the model
    checked would not be the one used. Refused, the provider never asked."""
    mock = native.mocks["gemini"].mock
    opened = len(mock.requests)
    key = native.keys.plain["gemini-flash"]
    assert _closed_with(native, f"{GEMINI_PATH}?key={key}", send=first) == (1002, reason)
    assert len(mock.requests) == opened


@pytest.mark.parametrize("key_id", ["good", "gemini-flash"])
def test_gemini_setup_model_that_is_a_virtual_key_is_not_logged(native, key_id):
    """A virtual key sent as the setup's model (an app that fills in the wrong field)
    was taken as the model: for a key with allowed_models it was refused with the model
    in the reason, so the key was logged; for one without, it became the session's
    model label and went to Google in the setup. Refused as a virtual key in the
    message, as a transcription update's is, the provider never asked."""
    key = native.keys.plain[key_id]
    mock = native.mocks["gemini"].mock
    opened, mark = len(mock.requests), log_mark(native)
    setup = json.dumps({"setup": {"model": f"models/{key}"}})
    assert _closed_with(native, f"{GEMINI_PATH}?key={key}", send=setup) == (
        4003, "a virtual key in the first message")
    assert len(mock.requests) == opened
    assert not [line for line in native.log_lines()[mark:] if key in json.dumps(line)]


def test_openai_transcription_update_a_provider_could_read_otherwise_is_refused(native):
    mock = native.mocks["openai"].mock
    opened = len(mock.requests)
    key = native.keys.plain["transcribe-only"]
    path = "/v1/realtime?intent=transcription"
    named = '{"transcription": {"model": "gpt-4o-transcribe", %s: "whisper-1"}}'
    for name, reason in (('"model"', TWICE), ('"MODEL"', "the first message spells 'model' in another case")):
        update = ('{"type": "session.update", "session": {"type": "transcription", "audio": {"input": %s}}}'
                  % (named % name))
        assert _closed_with(native, path, {"Authorization": f"Bearer {key}"}, send=update) == (1002, reason)
    assert len(mock.requests) == opened


def test_gemini_no_first_message_in_time(native):
    key = native.keys.plain["good"]
    with first_message_waited(native) as sidecar:
        assert _closed_with(sidecar, f"{GEMINI_PATH}?key={key}") == (1002, "no first message within 2 s")


def test_gemini_first_message_over_the_limit_gets_1009(native):
    """Judged on the frame header: the payload is never sent. The limit is
    first_message_bytes (1 MiB), not max_message_bytes (16 MiB): a held message is
    kept whole before its model is known, and a key holder could make the sidecar
    keep 16 MiB (twice over) per connection for the handshake timeout."""
    key = native.keys.plain["good"]

    async def body():
        reader, writer = await asyncio.open_connection("127.0.0.1", native.port)
        writer.write((f"GET {GEMINI_PATH}?key={key} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        writer.write(b"\x81\xff" + struct.pack(">Q", 1024 * 1024 + 1) + b"mask")
        frame = await reader.read(256)
        writer.close()
        return frame
    frame = run(body())
    assert frame[0] == 0x88 and struct.unpack(">H", frame[2:4])[0] == 1009
    assert frame[4:].decode() == "client: message over 1048576 bytes"


@pytest.mark.parametrize("path", ["/v1/../v1/listen?model=nova-3", "/v1/%2e%2e/v1/listen?model=nova-3",
                                  "/v1/listen/./?model=nova-3"])
def test_dot_segments_are_refused(native, path):
    with pytest.raises(InvalidStatus) as exc:
        _closed_with(native, path, {"Authorization": "Token x"})
    assert exc.value.response.status_code == 400


def test_the_header_key_wins_and_the_query_key_never_goes_upstream(native):
    good = native.keys.plain["good"]

    async def body():
        url = f"ws://127.0.0.1:{native.port}{GEMINI_PATH}?key=condt_in_the_query"
        async with connect(url, additional_headers={"x-goog-api-key": good}) as ws:
            await ws.send('{"setup": {"model": "models/gemini-x"}}')
            assert "setupComplete" in (await ws.recv()).decode()
    run(body())
    path, _ = _last_request(native, "gemini")
    assert "condt_in_the_query" not in path and path.endswith("?key=" + urllib.parse.quote(PROVIDER_SECRET, safe=""))


def test_a_key_in_the_routed_providers_subprotocol_form_never_goes_upstream(native):
    """On the sidecar's own path the key is read in OpenAI's forms, but the session goes
    to Deepgram, which reads a key from `token, KEY` (and `bearer, KEY`): a credential
    of the client's there would reach the provider beside the sidecar's."""
    good = native.keys.plain["good"]

    async def body():
        url = f"ws://127.0.0.1:{native.port}/v1/realtime/connect?provider=deepgram&model=nova-3"
        async with connect(url, additional_headers={"Authorization": f"Bearer {good}"},
                           subprotocols=["token", "dg-own-key", "bearer", "dg-jwt", "other"]) as ws:
            await ws.send(json.dumps({"type": "CloseStream"}))
            await ws.recv()
            return ws.subprotocol
    assert run(body()) == "other"  # the provider's choice (the mock's: the first offered)
    _, headers = _last_request(native, "deepgram")
    assert headers.get_all("Sec-WebSocket-Protocol") == ["other"]
    assert headers["Authorization"] == f"Token {PROVIDER_SECRET}"


def test_a_second_token_pair_never_goes_upstream_either(native):
    """Only the key after the first `token` was taken out of the offer: with `token, A,
    token, B`, B went to Deepgram. Each pair's key is a carrier now; the header's key
    is the session's."""
    good = native.keys.plain["good"]

    async def body(headers, offer):
        async with connect(f"ws://127.0.0.1:{native.port}/v1/listen?model=nova-3",
                           additional_headers=headers, subprotocols=offer) as ws:
            await ws.send(json.dumps({"type": "CloseStream"}))
            await ws.recv()
            return ws.subprotocol
    offer = ["token", "dg-own-key", "token", "dg-other-key", "other"]
    assert run(body({"Authorization": f"Token {good}"}, offer)) == "other"
    _, headers = _last_request(native, "deepgram")
    assert headers.get_all("Sec-WebSocket-Protocol") == ["other"]
    assert headers["Authorization"] == f"Token {PROVIDER_SECRET}"


def test_openais_account_subprotocols_never_go_upstream(native):
    """OpenAI's browser clients name the account a key acts for in subprotocols,
    `openai-organization.ORG` and `openai-project.PROJECT` (the openai Node SDK's
    OpenAIRealtimeWebSocket with `organization` or `project`; OpenAI reads them as its
    OpenAI-Organization and OpenAI-Project headers). They went upstream beside the
    sidecar's secret: a client chose the organization and project the operator's key
    acted and was billed for, which the same headers, dropped, cannot do."""
    key = native.keys.plain["good"]

    async def body():
        url = f"ws://127.0.0.1:{native.port}/v1/realtime?model=gpt-realtime-translate"
        offer = ["realtime", f"openai-insecure-api-key.{key}", "openai-organization.org-client",
                 "OpenAI-Project.proj_client"]  # browsers keep the case given
        async with connect(url, subprotocols=offer) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            return ws.subprotocol
    assert run(body()) == "realtime"
    _, headers = _last_request(native, "openai")
    assert headers.get_all("Sec-WebSocket-Protocol") == ["realtime"]


def test_only_allowed_client_parameters_pass(native):
    key = native.keys.plain["good"]

    async def body():
        url = (f"ws://127.0.0.1:{native.port}/v1/listen?model=nova-3&sample_rate=8000"
               "&callback_url_not_listed=x&keyterm=a%20b&keyterm=c")
        async with connect(url, additional_headers={"Authorization": f"Token {key}"}) as ws:
            await ws.send(json.dumps({"type": "CloseStream"}))
            await ws.recv()
    run(body())
    path, _ = _last_request(native, "deepgram")
    assert path == "/v1/listen?model=nova-3&sample_rate=8000&keyterm=a%20b&keyterm=c"


def test_the_model_parameter_given_twice_is_refused(native):
    with pytest.raises(InvalidStatus) as exc:
        _closed_with(native, "/v3/ws?speech_model=a&speech_model=b", {"Authorization": "x"})
    assert exc.value.response.status_code == 400


def test_query_params_may_not_name_the_templates_own_or_a_key():
    from conduit_sidecar.config import ConfigError, load
    from conduit_sidecar.routing import Router
    for param in ("speech_model", "token"):
        conf = load(None, environ={}, overrides={"providers": {"assemblyai": {
            "secret_env": "X", "query_params": [param]}}})
        with pytest.raises(ConfigError, match="query_params"):
            Router(conf, environ={"X": "s"})
