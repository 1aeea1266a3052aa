"""Deepgram's voice agent (`/v1/agent/converse`, on agent.deepgram.com): deepgram-sdk's
agent client, unchanged but for its base URL and a virtual key, through the sidecar to
the deepgram_agent mock. The provider's Welcome reaches the client first; the client's
Settings is held and every model it names checked against the key before it goes."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from conduit_sidecar import held
from conduit_sidecar.config import Config, Provider
from conduit_sidecar.handshake import Accept, Close, decide
from conduit_sidecar.keys import KEY_PREFIX, KeyEntry, KeySet, hash_key
from conduit_sidecar.routing import Router
from conftest import PROVIDER_SECRET, SidecarProcess, held_port, run, standard_keys, switching_protocols
from test_native_sdks import (_closed_with, _deepgram_client, _last_request, first_message_waited,
                              last_session, log_mark, metric, metric_becomes, node)
from test_native_sdks import native  # noqa: F401, F811  (the fixture: a sidecar, its mocks)
from test_pure import KEY, admission, upgrade

AGENT = "/v1/agent/converse"
# Deepgram's documented Settings shape (docs: voice-agent-settings, configure-voice-agent).
SETTINGS = {
    "type": "Settings",
    "audio": {"input": {"encoding": "linear16", "sample_rate": 16000},
              "output": {"encoding": "linear16", "sample_rate": 24000, "container": "none"}},
    "agent": {
        "language": "en",
        "listen": {"provider": {"type": "deepgram", "version": "v1", "model": "nova-3"}},
        "think": {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}, "prompt": "Be brief."},
        "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
    },
}


def _settings(**agent) -> str:
    return json.dumps({**SETTINGS, "agent": {**SETTINGS["agent"], **agent}})


@pytest.fixture(scope="module")
def sidecar(native):
    """`native` with `agent-voice`, for the agent's think, listen and speak models only."""
    native.keys.add("agent-voice", allowed_models=["gpt-4o-mini", "nova-3", "aura-2-*"])
    reloads = metric(native, "conduit_keys_reload_total", result="ok")
    native.keys.write(native.keys_file)
    assert metric_becomes(native, reloads + 1, "conduit_keys_reload_total", result="ok") == reloads + 1
    return native


def _no_virtual_key_upstream(sidecar) -> str:
    """The agent mock's last handshake: the provider secret in Deepgram's header form, no
    virtual key anywhere. Returns its path."""
    path, headers = _last_request(sidecar, "deepgram_agent")
    assert headers["Authorization"] == f"Token {PROVIDER_SECRET}"
    assert KEY_PREFIX not in path and KEY_PREFIX not in str(headers)
    assert "Sec-WebSocket-Protocol" not in headers
    return path


async def _until(ws, done, seconds: float = 10) -> list:
    """Messages (JSON decoded, binary as bytes) until `done(last)` or the close."""
    got: list = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        got.append(message if isinstance(message, bytes) else json.loads(message))
        if done(got[-1]):
            return got
    raise AssertionError(f"not done within {seconds} s: {got}")


def test_the_agent_through_the_python_sdk(sidecar):
    """Settings sent at once (the SDK's own flow), audio both ways, the agent's events
    back; the think model labels the session."""
    from deepgram.agent.v1.types import AgentV1Settings
    mark = log_mark(sidecar)
    client = _deepgram_client(sidecar, sidecar.keys.plain["agent-voice"])

    async def body():
        got = []
        async with client.agent.v1.connect() as agent:
            await agent.send_settings(AgentV1Settings.model_validate(SETTINGS))
            deadline = time.monotonic() + 10
            async for message in agent:
                got.append(message)
                kind = getattr(message, "type", None)
                if kind == "SettingsApplied":
                    for _ in range(50):                      # 1 s of 16 kHz PCM16, 20 ms frames
                        await agent.send_media(bytes(640))
                if kind == "AgentAudioDone" or time.monotonic() > deadline:
                    break
        return got

    got = run(body())
    events = [m.type for m in got if not isinstance(m, bytes)]
    assert events[:3] == ["Welcome", "SettingsApplied", "UserStartedSpeaking"], events
    assert events[-3:] == ["AgentThinking", "AgentStartedSpeaking", "AgentAudioDone"], events
    said = [(m.role, m.content) for m in got if getattr(m, "type", None) == "ConversationText"]
    assert said == [("user", "32000 bytes"), ("assistant", "gpt-4o-mini heard: 32000 bytes")]
    assert len(b"".join(m for m in got if isinstance(m, bytes))) == 4800   # 100 ms at 24 kHz PCM16
    assert _no_virtual_key_upstream(sidecar) == AGENT
    end = last_session(sidecar, "deepgram_agent", mark)
    assert (end["key_id"], end["model"]) == ("agent-voice", "gpt-4o-mini")
    assert not any(end["usage_tokens"].values())


def test_a_client_that_waits_for_welcome_before_its_settings(sidecar):
    """Deepgram's message-flow guide: no message before the Welcome. A browser's key
    subprotocol form (`token, KEY`), which never goes upstream or into the 101."""
    key = sidecar.keys.plain["agent-voice"]

    async def body():
        async with connect(f"ws://127.0.0.1:{sidecar.port}{AGENT}", subprotocols=["token", key]) as ws:
            assert ws.subprotocol == "token"
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await ws.send(_settings())
            applied = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await ws.send(json.dumps({"type": "InjectUserMessage", "content": "hello"}))
            turn = await _until(ws, lambda m: isinstance(m, dict) and m["type"] == "AgentAudioDone")
        return welcome, applied, turn

    welcome, applied, turn = run(body())
    assert welcome["type"] == "Welcome" and welcome["request_id"] and applied == {"type": "SettingsApplied"}
    assert [m["content"] for m in turn if isinstance(m, dict) and m["type"] == "ConversationText"] == [
        "hello", "gpt-4o-mini heard: hello"]
    _no_virtual_key_upstream(sidecar)


def test_the_welcome_is_counted_as_relayed(sidecar):
    """The Welcome goes to the client before the relay starts (the sidecar holds the
    Settings that follow it): it was in neither conduit_frames_total nor the session's
    session_end line, which counted one text message of the two the client read."""
    mark = log_mark(sidecar)
    frames = dict(direction="upstream_to_client", kind="text")
    before = metric(sidecar, "conduit_frames_total", **frames)
    key = sidecar.keys.plain["agent-voice"]

    async def body():
        async with connect(f"ws://127.0.0.1:{sidecar.port}{AGENT}",
                           additional_headers={"Authorization": f"Token {key}"}) as ws:
            welcome = await asyncio.wait_for(ws.recv(), 10)
            await ws.send(_settings())
            applied = await asyncio.wait_for(ws.recv(), 10)
        return welcome, applied

    welcome, applied = run(body())
    end = last_session(sidecar, "deepgram_agent", mark)
    assert end["frames_upstream_to_client"] == 3  # the Welcome, SettingsApplied, the close
    assert end["bytes_upstream_to_client"] == 2 + len(welcome) + 2 + len(applied) + 4
    assert metric(sidecar, "conduit_frames_total", **frames) == before + 2


def test_the_agent_through_the_node_sdk(sidecar):
    base, key = f"ws://127.0.0.1:{sidecar.port}", sidecar.keys.plain["agent-voice"]
    out = node("deepgram_agent_test.mjs", base, key, "gpt-4o-mini")
    assert out["types"][:2] == ["Welcome", "SettingsApplied"] and out["types"][-1] == "AgentAudioDone", out
    assert out["said"] == ["hello node", "gpt-4o-mini heard: hello node"]
    assert out["audioBytes"] == 3200                          # 100 ms at 16 kHz PCM16
    assert _no_virtual_key_upstream(sidecar) == AGENT
    refused = node("deepgram_agent_test.mjs", base, key, "gpt-4o")
    assert refused["types"] == ["Welcome"] and refused["close"] == [4003, "model 'gpt-4o' not allowed for this key"]


@pytest.mark.parametrize("key, reason", [("condt_wrong", "unknown key"), (None, "missing key")])
def test_a_wrong_or_missing_key_gets_4001(sidecar, key, reason):
    headers = {"Authorization": f"Token {key}"} if key else {}
    assert _closed_with(sidecar, AGENT, headers) == (4001, reason)


def _refused(sidecar, key_id: str, first: str | bytes) -> tuple[int, str]:
    """The close a first message gets, after the Welcome only: the refused message never
    reached the provider, which would have answered SettingsApplied."""
    async def body():
        async with connect(f"ws://127.0.0.1:{sidecar.port}{AGENT}",
                           additional_headers={"Authorization": f"Token {sidecar.keys.plain[key_id]}"}) as ws:
            await ws.send(first)
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "Welcome"
            with pytest.raises(ConnectionClosed) as exc:
                await asyncio.wait_for(ws.recv(), 10)
        return exc.value.rcvd.code, exc.value.rcvd.reason
    return run(body())


@pytest.mark.parametrize("key_id, settings, reason", [
    ("agent-voice", _settings(think={"provider": {"type": "open_ai", "model": "gpt-4o"}}),
     "model 'gpt-4o' not allowed for this key"),
    # A fallback names it: every think and speak provider is checked.
    ("agent-voice", _settings(speak=[{"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
                                     {"provider": {"type": "eleven_labs", "model_id": "eleven_turbo_v2_5"}}]),
     "model 'eleven_turbo_v2_5' not allowed for this key"),
    ("agent-voice", _settings(listen={"provider": {"type": "deepgram", "version": "v2",
                                                   "model": "flux-general-en"}}),
     "model 'flux-general-en' not allowed for this key"),
    ("models-only", _settings(), "model 'gpt-4o-mini' not allowed for this key"),
    # A stored agent configuration's id names no model a key's list could allow.
    ("agent-voice", json.dumps({**SETTINGS, "agent": "agent-config-id"}),
     "the first message must name a model for this key"),
    # An app that took its virtual key for its LLM's: it would go to Deepgram and on.
    ("good", _settings(think={"provider": {"type": "open_ai", "model": "gpt-4o-mini"},
                              "endpoint": {"url": "https://llm.example/v1/chat/completions",
                                           "headers": {"authorization": f"Bearer {KEY_PREFIX}x"}}}),
     "a virtual key in the Settings message"),
    # The same, one character JSON-escaped: Deepgram reads the key all the same.
    ("good", _settings(think={"provider": {"type": "open_ai", "model": "gpt-4o-mini"},
                              "endpoint": {"url": "https://llm.example/v1/chat/completions",
                                           "headers": {"authorization": "Bearer KEYx"}}}).replace(
                                               "KEY", KEY_PREFIX[:-1] + "\\u%04x" % ord(KEY_PREFIX[-1])),
     "a virtual key in the Settings message"),
])
def test_a_settings_the_key_does_not_allow_gets_4003(sidecar, key_id, settings, reason):
    assert _refused(sidecar, key_id, settings) == (4003, reason)


_THINK = {"provider": {"type": "open_ai", "model": "M"},
          "endpoint": {"url": "https://llm.example/v1/chat/completions", "headers": {"authorization": "A"}}}


@pytest.mark.parametrize("settings, reason", [
    # msgspec keeps the last of a member named twice; Deepgram's parser may keep the first.
    (_settings(think=_THINK).replace('"model": "M"', '"model": "gpt-4o", "model": "gpt-4o-mini"'),
     "the first message names a member twice"),
    # A virtual key in the first of two: it was out of the message as msgspec read it.
    (_settings(think=_THINK).replace('"model": "M"', '"model": "gpt-4o-mini"').replace(
        '"authorization": "A"', '"authorization": "Bearer %s\\u%04xx", "authorization": "Bearer x"'
        % (KEY_PREFIX[:-1], ord(KEY_PREFIX[-1]))),
     "the first message names a member twice"),
    # msgspec skips `Think`; a case-insensitive parser (Go's) reads it.
    (json.dumps({**SETTINGS, "agent": {**SETTINGS["agent"],
                                       "Think": {"provider": {"type": "open_ai", "model": "gpt-4o"}}}}),
     "the first message spells 'think' in another case"),
])
def test_a_settings_the_provider_could_read_otherwise_gets_1002(sidecar, settings, reason):
    assert _refused(sidecar, "agent-voice", settings) == (1002, reason)


def _after_settings(sidecar, key_id: str, later: str | bytes) -> list:
    """Settings the key allows, then `later` (a message, or frames as bytes, written as
    they are) and one audio chunk: the agent's messages after SettingsApplied until the
    audio's answer, UserStartedSpeaking (the `...Updated` an allowed update gets comes
    first), or the close code and reason."""
    async def body():
        async with connect(f"ws://127.0.0.1:{sidecar.port}{AGENT}",
                           additional_headers={"Authorization": f"Token {sidecar.keys.plain[key_id]}"}) as ws:
            await ws.send(_settings())
            await _until(ws, lambda m: isinstance(m, dict) and m["type"] == "SettingsApplied")
            if isinstance(later, bytes):
                ws.transport.write(later)
            else:
                await ws.send(later)
            await ws.send(bytes(3200))
            try:
                got = await _until(ws, lambda m: isinstance(m, dict) and m["type"] == "UserStartedSpeaking")
            except ConnectionClosed as exc:
                return [exc.rcvd.code, exc.rcvd.reason]
            return [m["type"] for m in got if isinstance(m, dict)]
    return run(body())


@pytest.mark.parametrize("key_id, later, answer", [
    ("agent-voice", {"type": "UpdateThink", "think": {"provider": {"type": "open_ai", "model": "gpt-4o"}}},
     [4003, "model 'gpt-4o' not allowed for this key"]),
    ("agent-voice", {"type": "UpdateSpeak", "speak": [
        {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
        {"provider": {"type": "eleven_labs", "model_id": "eleven_turbo_v2_5"}}]},
     [4003, "model 'eleven_turbo_v2_5' not allowed for this key"]),
    ("agent-voice", {"type": "UpdateSpeak", "speak": {"provider": {"type": "deepgram", "model": "aura-2-luna-en"}}},
     ["SpeakUpdated", "UserStartedSpeaking"]),
    ("good", {"type": "UpdateThink", "think": {**_THINK, "endpoint": {
        "url": "https://llm.example/v1/chat/completions", "headers": {"authorization": f"Bearer {KEY_PREFIX}x"}}}},
     [4003, "a virtual key in a later message"]),
])
def test_a_later_update_is_checked_as_the_settings_are(sidecar, key_id, later, answer):
    """Messages after Settings were relayed unread: an `Update*` could name a model the
    key may not use, or carry a virtual key to Deepgram. The agent's later text
    messages are now read whole and withheld until read; the refused ones never reach
    Deepgram (which would answer `...Updated`), an allowed one and the audio go on."""
    got = _after_settings(sidecar, key_id, json.dumps(later))
    assert got[:len(answer)] == answer and "ThinkUpdated" not in got


def test_a_refused_updates_type_is_not_repeated_whole_in_the_log(sidecar):
    """A later message's `type` (any text starting with "Update") named the refusal of
    its invalid model: a 1 MB type went whole into the `message_refused` line and the
    `session_end` line's close reason. The reason is bounded."""
    mark = log_mark(sidecar)
    update = {"type": "Update" + "X" * 1_000_000, "think": {"provider": {"type": "open_ai", "model": ""}}}
    got = _after_settings(sidecar, "good", json.dumps(update))
    assert got[0] == 1002
    end = last_session(sidecar, "deepgram_agent", mark)
    refused = [r for r in sidecar.log_lines()[mark:] if r.get("event") == "message_refused"]
    assert refused and max(len(json.dumps(r)) for r in [*refused, end]) < 2000


def test_a_message_read_whole_is_bounded_in_its_fragments_headers_too(sidecar):
    """A later text message is withheld whole: its empty continuation frames (6 bytes
    of header each, no payload) were withheld without bound, past the 4 MiB a message
    may hold. Its fragments' headers and control frames now count toward the 64 KiB
    allowed besides its payload: 1009, and none of it reaches Deepgram."""
    def fragment(opcode: int, payload: bytes, fin: bool) -> bytes:
        return Frame(Opcode(opcode), payload, fin=fin).serialize(mask=True)

    frames = (fragment(1, b'{"type": "KeepAlive"', False) + fragment(0, b"", False) * 20000
              + fragment(0, b"}", True))
    assert _after_settings(sidecar, "agent-voice", frames) == [
        1009, "client: control frames and fragment headers inside a message over 65536 bytes"]


@pytest.mark.parametrize("first", ['{"type": "KeepAlive"}', "not json", b"\x00\x01pcm",
                                   '{"type": "Settings", "audio": {}}'])
def test_a_first_message_that_is_not_settings_gets_1002(sidecar, first):
    assert _refused(sidecar, "good", first) == (1002, "the first message must be a Settings message")


def test_no_settings_in_time_gets_1002(sidecar):
    async def body(waited):
        async with connect(f"ws://127.0.0.1:{waited.port}{AGENT}",
                           additional_headers={"Authorization": f"Token {waited.keys.plain['good']}"}) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "Welcome"
            with pytest.raises(ConnectionClosed) as exc:
                await asyncio.wait_for(ws.recv(), 10)
        return exc.value.rcvd.code, exc.value.rcvd.reason
    with first_message_waited(sidecar) as waited:
        assert run(body(waited)) == (1002, "no first message within 2 s")


@pytest.mark.parametrize("settings, models", [
    (SETTINGS, ("gpt-4o-mini", "nova-3", "aura-2-thalia-en")),
    ({**SETTINGS, "agent": {"think": [{"provider": {"type": "anthropic", "model": "claude-3-5-haiku"}},
                                      {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}}],
                            "speak": {"provider": {"type": "aws_polly", "voice": "Matthew",
                                                   "engine": "neural"}}}},
     ("claude-3-5-haiku", "gpt-4o-mini")),
    ({**SETTINGS, "agent": "agent-config-id"}, ()),
])
def test_the_models_a_settings_names(settings, models):
    """Think's first (the session's label), then listen's and speak's; AWS Polly's
    voice and a stored agent's id name none."""
    assert held.agent_settings(json.dumps(settings).encode()) == models


class _Upstream:
    """A provider leg as read_greeting sees it: bytes are handed to its protocol."""

    def __init__(self):
        self.reading = False

    def set_protocol(self, protocol):
        self.protocol = protocol

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    size = len(payload)
    head = bytes([0x80 * fin | opcode])
    return head + (bytes([size]) if size < 126 else bytes([126]) + size.to_bytes(2, "big")) + payload


def test_the_greeting_ends_with_the_providers_first_message():
    """A ping, then a Welcome in two fragments (one over 125 bytes), and the start of
    the next message: the client gets up to the Welcome's last frame, the relay what
    was read after it (reading then pauses: the rest stays unread for the relay); a
    greeting cut anywhere is completed by later reads."""
    greeting = _frame(0x9, b"") + _frame(0x1, b'{"type": "Welcome", ', fin=False) + _frame(
        0x0, b'"request_id": "' + b"r" * 200 + b'"}')
    after = _frame(0x2, bytes(10))[:5]

    async def body(cut: int):
        upstream = _Upstream()
        read = asyncio.ensure_future(held.read_greeting(upstream, (greeting + after)[:cut], 1 << 20, 5, set()))
        await asyncio.sleep(0)  # one turn of the loop: read_greeting is now waiting for bytes
        if not read.done():
            assert upstream.reading
            upstream.protocol.data_received((greeting + after)[cut:])
        return await read, upstream.reading
    for cut in (0, 1, 3, len(greeting) - 1, len(greeting) + 2):
        rest = after[: cut - len(greeting)] if cut > len(greeting) else after
        assert run(body(cut)) == ((greeting, rest), False)


@pytest.mark.parametrize("before, close, refused", [
    (b"", b"", (1014, "the provider closed before its first message", None)),
    (b"", b"\x03\xe8", (1014, "the provider closed before its first message (1000)", (1000, ""))),
    (_frame(0x9, b"p"), b"\x0f\xa0bye", (1014, "the provider closed before its first message (4000)",
                                        (4000, "bye"))),
])
def test_a_provider_that_closes_before_its_greeting_is_refused_with_its_close(before, close, refused):
    """Counted and logged as 1014; the provider's code and reason (if any) are the client's."""
    async def body():
        with pytest.raises(held.Refused) as exc:
            await held.read_greeting(_Upstream(), before + _frame(0x8, close), 1 << 20, 5, set())
        return exc.value.code, str(exc.value), exc.value.close
    assert run(body()) == refused


@pytest.mark.parametrize("form", [None, 126, 127], ids=["7-bit", "16-bit", "64-bit"])
def test_the_providers_close_before_its_greeting_reaches_the_client(tmp_path, form):
    """A provider that closes right after its 101 (the client has its own 101 by then):
    the client got 1014 `the provider closed before its first message`, where a relayed
    session passes the provider's code and reason on unchanged (DESIGN, close codes),
    but for a secret it quotes (the key it was sent: `***`, as the relay's).
    The close's length in a longer form than it needs (RFC 6455 5.2 asks senders for
    the shortest; receivers take any, as the relay does): its code and reason were
    read from the length's bytes, a `UnicodeDecodeError` traceback, and 1014."""
    port = held_port()
    sidecar = SidecarProcess(str(tmp_path), f'[providers.deepgram_agent]\nurl = "ws://127.0.0.1:{port}{AGENT}"\n'
                             'secret_env = "PROVIDER_KEY"\n', standard_keys()).start()
    payload = (4000).to_bytes(2, "big") + f"agent unavailable for {PROVIDER_SECRET}".encode()
    length = {None: b"", 126: len(payload).to_bytes(2, "big"), 127: len(payload).to_bytes(8, "big")}[form]
    close = bytes([0x88, form or len(payload)]) + length + payload

    async def provider(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(switching_protocols(head) + close)
        await reader.read()
        writer.close()

    async def body():
        server = await asyncio.start_server(provider, "127.0.0.1", port)
        try:
            async with connect(f"ws://127.0.0.1:{sidecar.port}{AGENT}",
                               additional_headers={"Authorization": f"Token {sidecar.keys.plain['good']}"}) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 10)
            return closed.value.rcvd.code, closed.value.rcvd.reason
        finally:
            server.close()
    try:
        got = run(body())
        output = sidecar.output()
    finally:
        sidecar.stop()
    assert got == (4000, "agent unavailable for ***")
    assert "Traceback" not in output and PROVIDER_SECRET not in output


@pytest.mark.parametrize("frame, why", [
    (bytes([0xC1, 0]), "reserved bits set (no extension was negotiated)"),
    (bytes([0x81, 0x80]) + bytes(4), "masked frame from the upstream"),
    (bytes([0x83, 0]), "reserved opcode 3"),
    (bytes([0x80, 0]), "continuation frame without a message to continue"),
])
def test_a_greeting_is_checked_as_every_relayed_frame_is(frame, why):
    """It reaches the client before the relay starts: the relay's scanner judges it."""
    async def body():
        with pytest.raises(held.Refused) as exc:
            await held.read_greeting(_Upstream(), _frame(0x9, b"") + frame, 1 << 20, 5, set())
        return exc.value.code, str(exc.value)
    assert run(body()) == (1014, f"the provider's first message: {why}")


def test_the_agent_is_its_own_provider_on_its_own_host():
    """deepgram_agent's template: agent.deepgram.com, the key as on /v1/listen. A config
    with only [providers.deepgram] does not serve it (4004), whose secret it does not
    borrow; the agent's section may name the same one."""
    keyset = KeySet([KeyEntry("k", hash_key(KEY))])
    only_listen = Router(Config(providers={"deepgram": Provider(secret_env="S")}), environ={"S": "dg"})
    d = decide(upgrade(AGENT, key=None, Authorization=f"Token {KEY}"), admission(keyset=keyset, router=only_listen))
    assert isinstance(d, Close) and (d.code, d.reason) == (4004, "unknown provider 'deepgram_agent'")
    both = Router(Config(providers={"deepgram": Provider(secret_env="S"),
                                    "deepgram_agent": Provider(secret_env="S")}), environ={"S": "dg"})
    d = decide(upgrade(AGENT, key=None, Authorization=f"Bearer {KEY}"), admission(keyset=keyset, router=both))
    assert isinstance(d, Accept) and d.greeted and d.hold is held.agent_settings and d.model is None
    up = both.upstream(d.route.targets[0], d.model, d.query, d.kept)
    assert (up.uri.host, up.uri.resource_name, up.headers) == (
        "agent.deepgram.com", AGENT, [("Authorization", "Token dg")])
