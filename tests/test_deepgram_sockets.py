"""Deepgram's Flux (`/v2/listen`) and streaming TTS (`/v1/speak`, Flux TTS `/v2/speak`) sockets: deepgram-sdk,
unchanged but for its base URL and a virtual key as its API key, through the sidecar to
the deepgram mock (which answers by the request path); the key forms, the query
allow-lists, the policy, and what is metered."""

from __future__ import annotations

import asyncio
import time
import urllib.parse

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conduit_sidecar.config import Config, Provider
from conduit_sidecar.handshake import Accept, Close, decide
from conduit_sidecar.keys import KEY_PREFIX, KeyEntry, KeySet, hash_key
from conduit_sidecar.routing import Router
from conftest import PROVIDER_SECRET, run
from test_native_sdks import (_closed_with, _deepgram_client, _last_request, _stream_a_second, last_session,
                              log_mark, metric, metric_becomes, node)
from test_native_sdks import native  # noqa: F401, F811  (the fixture: a sidecar, its mocks)
from test_pure import KEY, admission, upgrade

FLUX = "/v2/listen?model=flux-general-en"
SPEAK = "/v1/speak?model=aura-2-thalia-en"
SPEAK_V2 = "/v2/speak?model=flux-alexis-en"
BUDGET = 1.5  # the `flux-budget` key's audio seconds a day


@pytest.fixture(scope="module")
def sidecar(native):
    """`native` with two more keys: `voice`, for Deepgram's Flux and Aura models only,
    and `flux-budget`, with an audio_seconds budget."""
    native.keys.add("voice", allowed_models=["flux-*", "aura-*"])
    native.keys.add("flux-budget", budgets=[{"metric": "audio_seconds", "limit": BUDGET, "window": "day"}])
    reloads = metric(native, "conduit_keys_reload_total", result="ok")
    native.keys.write(native.keys_file)
    assert metric_becomes(native, reloads + 1, "conduit_keys_reload_total", result="ok") == reloads + 1
    return native


def _no_virtual_key_upstream(sidecar):
    """The deepgram mock's last handshake: the provider secret in Deepgram's header form,
    no virtual key anywhere (path, headers, subprotocols). Returns (path, query)."""
    path, headers = _last_request(sidecar, "deepgram")
    assert headers["Authorization"] == f"Token {PROVIDER_SECRET}"
    assert KEY_PREFIX not in path and KEY_PREFIX not in str(headers)
    url = urllib.parse.urlsplit(path)
    return url.path, urllib.parse.parse_qsl(url.query)


def test_flux_through_the_python_sdk(sidecar):
    mark = log_mark(sidecar)
    client = _deepgram_client(sidecar, sidecar.keys.plain["voice"])

    got = run(_stream_a_second(lambda: client.listen.v2.connect(
        model="flux-general-en", encoding="linear16", sample_rate="16000", eot_threshold="0.7")))
    assert [m.type for m in got][0] == "Connected", got
    turns = [m for m in got if m.type == "TurnInfo"]
    assert [t.event for t in turns] == ["StartOfTurn", "Update", "EndOfTurn"], turns
    assert turns[-1].transcript == "32000 bytes at linear16/16000"
    assert _no_virtual_key_upstream(sidecar) == ("/v2/listen", [
        ("model", "flux-general-en"), ("encoding", "linear16"), ("sample_rate", "16000"),
        ("eot_threshold", "0.7")])
    end = last_session(sidecar, "deepgram", mark)
    assert (end["key_id"], end["model"], end["close_code"]) == ("voice", "flux-general-en", 1000)


def test_flux_reconfigured_through_the_python_sdk(sidecar):
    """Flux's Configure (thresholds, keyterms mid-stream) goes through, and its
    ConfigureSuccess, naming what is now in effect, comes back."""
    from deepgram.listen.v2.types import ListenV2Configure, ListenV2ConfigureThresholds
    client = _deepgram_client(sidecar, sidecar.keys.plain["voice"])

    got = run(_stream_a_second(
        lambda: client.listen.v2.connect(model="flux-general-en", encoding="linear16", sample_rate="16000"),
        ListenV2Configure(thresholds=ListenV2ConfigureThresholds(eot_threshold=0.8), keyterms=["Flux"])))
    assert [m.type for m in got][:2] == ["Connected", "ConfigureSuccess"], got
    assert (got[1].thresholds.eot_threshold, got[1].keyterms) == (0.8, ["Flux"])
    assert got[-1].type == "TurnInfo" and got[-1].event == "EndOfTurn"


def test_flux_thresholds_reconfigured_one_at_a_time_all_hold(sidecar):
    """Flux updates each threshold a Configure supplies and keeps the others: two
    Configures of one threshold each leave both in effect. The mock took the second's
    thresholds for the whole set, its ConfigureSuccess naming the first's gone."""
    from deepgram.listen.v2.types import ListenV2Configure, ListenV2ConfigureThresholds
    client = _deepgram_client(sidecar, sidecar.keys.plain["voice"])

    got = run(_stream_a_second(
        lambda: client.listen.v2.connect(model="flux-general-en", encoding="linear16", sample_rate="16000"),
        ListenV2Configure(thresholds=ListenV2ConfigureThresholds(eot_threshold=0.8)),
        ListenV2Configure(thresholds=ListenV2ConfigureThresholds(eager_eot_threshold=0.5))))
    done = [m for m in got if m.type == "ConfigureSuccess"]
    assert len(done) == 2, got
    assert (done[1].thresholds.eot_threshold, done[1].thresholds.eager_eot_threshold) == (0.8, 0.5)


async def _speak_until_flushed(connecting, speak) -> list:
    """On the deepgram-sdk speak connection `connecting()` opens: `speak(conn)`, Flush,
    and Close once Flushed comes; every message received."""
    got: list = []
    async with connecting() as conn:
        await speak(conn)
        await conn.send_flush()
        async for message in conn:
            got.append(message)
            if getattr(message, "type", None) == "Flushed":
                await conn.send_close()
    return got


def test_speak_through_the_python_sdk_meters_nothing(sidecar):
    """Text goes, audio comes back. Speak's `Metadata` carries no duration: it is not
    read as a listen stream's seconds, nor counted as malformed usage."""
    from deepgram.speak.v1.types import SpeakV1Text
    mark = log_mark(sidecar)
    labels = dict(key_id="voice", provider="deepgram", model="aura-2-thalia-en", kind="audio")
    malformed = metric(sidecar, "conduit_usage_malformed_total", provider="deepgram")
    client = _deepgram_client(sidecar, sidecar.keys.plain["voice"])

    got = run(_speak_until_flushed(
        lambda: client.speak.v1.connect(model="aura-2-thalia-en", encoding="linear16", sample_rate=24000),
        lambda conn: conn.send_text(SpeakV1Text(text="Hello there"))))
    assert got[0].type == "Metadata" and got[0].model_name == "aura-2-thalia-en", got
    audio = b"".join(m for m in got if isinstance(m, bytes))
    assert len(audio) == len("Hello there") * 2400         # the mock's 50 ms of 24 kHz PCM16 each
    assert (got[-1].type, got[-1].sequence_id) == ("Flushed", 0)
    assert _no_virtual_key_upstream(sidecar) == ("/v1/speak", [
        ("model", "aura-2-thalia-en"), ("encoding", "linear16"), ("sample_rate", "24000")])
    end = last_session(sidecar, "deepgram", mark)
    assert (end["key_id"], end["model"], end["close_code"]) == ("voice", "aura-2-thalia-en", 1000)
    assert end["usage_seconds"] == {"audio": 0.0} and not any(end["usage_tokens"].values())
    assert metric(sidecar, "conduit_usage_seconds_total", **labels) == 0
    assert metric(sidecar, "conduit_usage_malformed_total", provider="deepgram") == malformed


def test_flux_tts_through_the_python_sdk_meters_nothing(sidecar):
    """Flux TTS (speak.v2, in deepgram-sdk since 7.10): text goes, a turn's audio comes
    back between SpeechStarted and SpeechMetadata. Its character counts are not usage
    the sidecar meters (it has no character budget): nothing is counted."""
    from deepgram.speak.v2.types import SpeakV2Speak
    mark = log_mark(sidecar)
    malformed = metric(sidecar, "conduit_usage_malformed_total", provider="deepgram")
    client = _deepgram_client(sidecar, sidecar.keys.plain["voice"])

    got = run(_speak_until_flushed(
        lambda: client.speak.v2.connect(model="flux-alexis-en", encoding="linear16", sample_rate="24000",
                                        expressivity=1),
        lambda conn: conn.send_speak(SpeakV2Speak(text="Hello Flux"))))
    events = [m.type for m in got if not isinstance(m, bytes)]
    assert events == ["Connected", "SpeechStarted", "SpeechMetadata", "Flushed", "SessionMetadata"], got
    assert got[0].model_name == "flux-alexis-en"
    assert len(b"".join(m for m in got if isinstance(m, bytes))) == len("Hello Flux") * 2400
    assert got[-1].total_billable_character_count == len("Hello Flux")
    assert _no_virtual_key_upstream(sidecar) == ("/v2/speak", [
        ("model", "flux-alexis-en"), ("encoding", "linear16"), ("sample_rate", "24000"),
        ("expressivity", "1")])
    end = last_session(sidecar, "deepgram", mark)
    assert (end["key_id"], end["model"], end["close_code"]) == ("voice", "flux-alexis-en", 1000)
    assert end["usage_seconds"] == {"audio": 0.0} and not any(end["usage_tokens"].values())
    assert metric(sidecar, "conduit_usage_malformed_total", provider="deepgram") == malformed


def test_flux_and_speak_through_the_node_sdk(sidecar):
    base, key = f"ws://127.0.0.1:{sidecar.port}", sidecar.keys.plain["voice"]
    flux = node("deepgram_sockets_test.mjs", base, key, "flux")
    assert flux["types"] == ["Connected", "TurnInfo", "TurnInfo", "TurnInfo"], flux
    assert flux["transcript"] == "32000 bytes at linear16/16000" and flux["close"][0] == 1000
    assert _no_virtual_key_upstream(sidecar)[0] == "/v2/listen"
    speak = node("deepgram_sockets_test.mjs", base, key, "speak")
    assert speak["types"] == ["Metadata", "Flushed"] and speak["close"][0] == 1000, speak
    assert speak["audioBytes"] == len("Hello node") * 2400
    assert _no_virtual_key_upstream(sidecar)[0] == "/v1/speak"
    flux_tts = node("deepgram_sockets_test.mjs", base, key, "speak2")
    assert flux_tts["types"] == ["Connected", "SpeechStarted", "SpeechMetadata", "Flushed",
                                 "SessionMetadata"] and flux_tts["close"][0] == 1000, flux_tts
    assert flux_tts["audioBytes"] == len("Hello node") * 2400
    assert _no_virtual_key_upstream(sidecar)[0] == "/v2/speak"


@pytest.mark.parametrize("path, first", [(FLUX, "Connected"), (SPEAK, "Metadata"), (SPEAK_V2, "Connected")])
@pytest.mark.parametrize("form", ["Token", "Bearer", "token", "bearer"])
def test_every_deepgram_key_form(sidecar, path, first, form):
    """Authorization `Token`/`Bearer` (the SDKs), subprotocols `token, KEY` / `bearer, KEY`
    (browsers): the key is read, and none of them goes upstream or into the 101."""
    key = sidecar.keys.plain["voice"]

    async def body():
        if form.istitle():
            args = dict(additional_headers={"Authorization": f"{form} {key}"})
        else:
            args = dict(subprotocols=[form, key])
        async with connect(f"ws://127.0.0.1:{sidecar.port}{path}", **args) as ws:
            assert ws.subprotocol == (None if form.istitle() else form)
            assert f'"{first}"' in await ws.recv()
    run(body())
    _, headers = _last_request(sidecar, "deepgram")
    _no_virtual_key_upstream(sidecar)
    assert "Sec-WebSocket-Protocol" not in headers          # neither the key nor its marker


@pytest.mark.parametrize("path, passed", [
    (FLUX + "&encoding=mulaw&sample_rate=8000&callback=http%3A%2F%2Fx&interim_results=true"
     "&keyterm=a%20b&keyterm=c&eot_timeout_ms=3000&speed=1.2&language_hint=en",
     [("model", "flux-general-en"), ("encoding", "mulaw"), ("sample_rate", "8000"), ("keyterm", "a b"),
      ("keyterm", "c"), ("eot_timeout_ms", "3000"), ("language_hint", "en")]),
    (SPEAK + "&encoding=mulaw&sample_rate=8000&callback=http%3A%2F%2Fx&callback_method=POST"
     "&speed=1.2&bit_rate=8000&eot_threshold=0.6&tag=t",
     [("model", "aura-2-thalia-en"), ("encoding", "mulaw"), ("sample_rate", "8000"), ("speed", "1.2"),
      ("bit_rate", "8000"), ("tag", "t")]),
    (SPEAK_V2 + "&encoding=mulaw&sample_rate=8000&callback=http%3A%2F%2Fx&callback_method=POST"
     "&speed=1.2&expressivity=-1&bit_rate=8000&container=wav&mip_opt_out=true&tag=t",
     [("model", "flux-alexis-en"), ("encoding", "mulaw"), ("sample_rate", "8000"), ("speed", "1.2"),
      ("expressivity", "-1"), ("mip_opt_out", "true"), ("tag", "t")]),
])
def test_only_each_paths_own_parameters_pass(sidecar, path, passed):
    """Each socket has its own allow-list: no callback (a client does not choose where
    Deepgram calls out), nor the other socket's or /v1/listen's parameters."""
    key = sidecar.keys.plain["voice"]

    async def body():
        async with connect(f"ws://127.0.0.1:{sidecar.port}{path}",
                           additional_headers={"Authorization": f"Token {key}"}) as ws:
            await ws.recv()
    run(body())
    assert _no_virtual_key_upstream(sidecar)[1] == passed


@pytest.mark.parametrize("path", [FLUX, SPEAK, SPEAK_V2])
@pytest.mark.parametrize("key, reason", [("condt_wrong", "unknown key"), (None, "missing key")])
def test_a_wrong_or_missing_key_gets_4001(sidecar, path, key, reason):
    headers = {"Authorization": f"Token {key}"} if key else {}
    assert _closed_with(sidecar, path, headers) == (4001, reason)


@pytest.mark.parametrize("key_id, path, code, reason", [
    ("voice", "/v2/listen?model=nova-3", 4003, "model 'nova-3' not allowed for this key"),
    ("models-only", SPEAK, 4003, "model 'aura-2-thalia-en' not allowed for this key"),
    ("restricted", FLUX, 4003, "provider 'deepgram' not allowed for this key"),
    ("voice", "/v1/speak?encoding=linear16", 4004, "provider 'deepgram' needs a model"),
    ("voice", "/v2/speak?model=nova-3", 4003, "model 'nova-3' not allowed for this key"),
    ("models-only", SPEAK_V2, 4003, "model 'flux-alexis-en' not allowed for this key"),
    ("voice", "/v2/speak?encoding=linear16", 4004, "provider 'deepgram' needs a model"),
])
def test_the_model_and_provider_are_checked(sidecar, key_id, path, code, reason):
    headers = {"Authorization": f"Token {sidecar.keys.plain[key_id]}"}
    assert _closed_with(sidecar, path, headers) == (code, reason)


def test_flux_audio_is_counted_in_the_format_its_query_names(sidecar):
    """2 s of 8 kHz mu-law (16,000 bytes; a third of a second in [audio]'s 24 kHz
    PCM16) crosses a 1.5 s audio_seconds budget: the session is closed with 4002."""
    key = sidecar.keys.plain["flux-budget"]

    async def body():
        async with connect(f"ws://127.0.0.1:{sidecar.port}{FLUX}&encoding=mulaw&sample_rate=8000",
                           additional_headers={"Authorization": f"Token {key}"}) as ws:
            await ws.send(bytes(16_000))
            deadline = time.monotonic() + 10
            with pytest.raises(ConnectionClosed) as exc:
                while time.monotonic() < deadline:            # the mock's TurnInfo events
                    await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        return exc.value.rcvd
    rcvd = run(body())
    assert rcvd.code == 4002 and rcvd.reason.startswith(f"budget exhausted: audio_seconds per day ({BUDGET:g})")


# -- which deployments and providers serve the paths (no sockets) ---------------------

def test_the_path_replaces_the_deepgram_urls_listen_path():
    """The deployment's host and any prefix stay, /v1/listen at the path's end becomes
    the client's path; a provider of the user's whose URL ends so serves it too (as a
    route's fallback), another built-in or a URL ending otherwise does not."""
    conf = Config(providers={"deepgram": Provider(url="wss://dg.example/proxy/v1/listen?model={model}",
                                                  secret_env="S"),
                             "mine": Provider(url="ws://127.0.0.1:9/stt/v1/listen?model={model}"),
                             "other": Provider(url="ws://127.0.0.1:9/v1/transcribe?model={model}"),
                             "assemblyai": Provider(url="ws://127.0.0.1:9/v1/listen?speech_model={model}",
                                                    secret_env="S")},
                  routes={m: ["deepgram", "assemblyai", "other", "mine"] for m in ("flux-*", "aura-*")})
    r = Router(conf, environ={"S": "dg-secret"})
    state = admission(keyset=KeySet([KeyEntry("k", hash_key(KEY))]), router=r)
    for path, upstream in ((FLUX + "&encoding=linear16", "/proxy/v2/listen?model=flux-general-en&encoding=linear16"),
                           (SPEAK + "&speed=1.1", "/proxy/v1/speak?model=aura-2-thalia-en&speed=1.1"),
                           (SPEAK_V2 + "&speed=1.1", "/proxy/v2/speak?model=flux-alexis-en&speed=1.1")):
        d = decide(upgrade(path, key=None, Authorization=f"Bearer {KEY}"), state)
        assert isinstance(d, Accept), d
        up = r.upstream(d.route.targets[0], d.model, d.query, d.kept)
        assert (up.uri.host, up.uri.resource_name, up.headers) == (
            "dg.example", upstream, [("Authorization", "Token dg-secret")])
        fallbacks = r.fallbacks(d.route, d.model, d.kept)
        assert [f.name for f in fallbacks] == ["mine"]
        assert r.upstream(fallbacks[0].targets[0], d.model, d.query, d.kept).uri.resource_name == (
            "/stt" + upstream.removeprefix("/proxy"))
    elsewhere = Router(Config(providers={"deepgram": Provider(url="wss://dg.example/stt?model={model}",
                                                              secret_env="S")}), environ={"S": "s"})
    d = decide(upgrade(FLUX, key=None, Authorization=f"Token {KEY}"), admission(
        keyset=KeySet([KeyEntry("k", hash_key(KEY))]), router=elsewhere))
    assert isinstance(d, Close) and (d.code, d.reason) == (4004, "provider 'deepgram' does not serve /v2/listen")
