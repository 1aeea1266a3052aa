"""The pure parts, without sockets: the handshake decision, routing, the request
reader, key rechecks and the config loader. (Everything else is tested over
loopback against real processes.)"""

import asyncio
import datetime as dt
import json
import os
import re

import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request

from conduit_sidecar import config as config_module, held
from conduit_sidecar.config import Config, ConfigError, Provider
from conduit_sidecar.handshake import Accept, Admission, Close, Refuse, decide, parse_query
from conduit_sidecar.httpread import BadRequest, RequestReader
from conduit_sidecar.keys import KeyEntry, KeySet, Rejection, hash_key, load_keys
from conduit_sidecar.metering import MODEL_LABELS_MAX
from conduit_sidecar.routing import RouteError, Router
from conduit_sidecar.server import Sidecar

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
KEY = "condt_unit-test-key"
OTHER = "condt_other-key"
ENTRIES = [
    KeyEntry("good", hash_key(KEY), max_connections=2, allowed_models=["gpt-*"]),
    KeyEntry("off", hash_key(OTHER), enabled=False),
]


def router() -> Router:
    conf = Config(providers={"local": Provider(url="ws://127.0.0.1:9/v1/realtime?model={model}",
                                               headers={"Authorization": "Bearer {secret}"},
                                               secret_env="SECRET", models=["gpt-*"]),
                             "pathy": Provider(url="ws://127.0.0.1:9/x/{model}/y")})
    return Router(conf, environ={"SECRET": "sk-up"})


def admission(**changes) -> Admission:
    fields = dict(keyset=KeySet(ENTRIES), router=router(), now=NOW, live_per_key={},
                  at_capacity=False, draining=False, allowed_origins=None)
    fields.update(changes)
    return Admission(**fields)


def upgrade(path="/v1/realtime?model=gpt-realtime", key: str | None = KEY, **headers) -> Request:
    h = Headers([("Host", "127.0.0.1"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
                 ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")])
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    for name, value in headers.items():
        h[name.replace("_", "-")] = value
    return Request(path, h)


def test_a_good_key_is_accepted_with_its_route():
    d = decide(upgrade(), admission())
    assert isinstance(d, Accept) and d.route.name == "local" and d.model == "gpt-realtime"
    assert d.response.status_code == 101


@pytest.mark.parametrize("request_, why", [
    (upgrade(key=None), Rejection.MISSING),
    (upgrade(key="condt_nope"), Rejection.UNKNOWN),
    (upgrade(key=OTHER), Rejection.DISABLED),
])
def test_key_rejections_close_with_4001_and_a_named_cause(request_, why):
    d = decide(request_, admission())
    assert isinstance(d, Close) and (d.code, d.reason, d.rejection) == (4001, why.value, why)


def test_expiry_is_judged_against_the_admission_clock():
    entries = [KeyEntry("soon", hash_key(KEY), expires_at=NOW + dt.timedelta(seconds=1))]
    assert isinstance(decide(upgrade(), admission(keyset=KeySet(entries))), Accept)
    later = admission(keyset=KeySet(entries), now=NOW + dt.timedelta(seconds=1))
    assert decide(upgrade(), later).rejection is Rejection.EXPIRED


def test_policy_and_capacity():
    assert decide(upgrade("/v1/realtime?model=other&provider=local"), admission()).code == 4003
    assert decide(upgrade(), admission(live_per_key={"good": 2})).code == 4029
    assert decide(upgrade(), admission(at_capacity=True)).code == 1013
    assert decide(upgrade(), admission(draining=True)).code == 1013
    # Its line names a key that would have been admitted (looked up: it named none),
    # never one that would not.
    assert decide(upgrade(), admission(draining=True)).key.id == "good"
    assert decide(upgrade(key=OTHER), admission(at_capacity=True)).key is None  # disabled
    assert decide(upgrade(key="condt_nope"), admission(draining=True)).key is None
    assert decide(upgrade("/v1/realtime?provider=nope"), admission()).code == 4004
    refused = decide(upgrade("/elsewhere"), admission())
    assert isinstance(refused, Refuse) and refused.response.status_code == 404


def test_key_subprotocol_any_case_is_the_key_and_never_echoed():
    d = decide(upgrade(key=None, Sec_WebSocket_Protocol=f"realtime, OpenAI-Insecure-API-Key.{KEY}"),
               admission())
    assert isinstance(d, Accept) and d.subprotocols == ["realtime"]
    assert d.response.headers["Sec-WebSocket-Protocol"] == "realtime"


@pytest.mark.parametrize("offer", [f"realtime, token, {KEY}", f"realtime, Token, {KEY}",
                                   f"realtime, x-key.{KEY}"])
def test_a_key_in_a_form_the_path_does_not_read_is_still_never_forwarded(offer):
    """The key in the Authorization header, and again in a subprotocol form of
    another provider's (Deepgram's `token, K`, in any case) or none: that offer went
    upstream and could be the one the 101 selected."""
    d = decide(upgrade(Sec_WebSocket_Protocol=offer), admission())
    assert isinstance(d, Accept)
    assert not any(KEY in p for p in d.subprotocols or [])
    assert d.response.headers["Sec-WebSocket-Protocol"] == "realtime"


@pytest.mark.parametrize("query", [f"model={KEY}&provider=local", f"model=m&provider={KEY}",
                                   f"model=m&provider=local&{KEY}=1", f"model=x-{KEY}&provider=local"])
def test_a_virtual_key_in_a_parameter_that_holds_none_is_refused_unrepeated(query):
    """Swapped parameters: the key went into the rejection's log line, the session's
    model label and the provider's URL."""
    d = decide(upgrade(f"/v1/realtime?{query}"), admission())
    assert isinstance(d, Refuse) and d.response.status_code == 400
    assert KEY not in d.reason and KEY.encode() not in d.response.serialize()


def test_a_refusal_never_repeats_a_header_value():
    d = decide(upgrade(key=None, Sec_WebSocket_Protocol=f"openai-insecure-api-key.{KEY}, [x"),
               admission())
    assert isinstance(d, Refuse)
    assert KEY not in d.reason and KEY.encode() not in d.response.serialize()


def test_key_recheck_by_hash():
    entry = ENTRIES[0]
    rotated = KeySet([KeyEntry("good", hash_key("condt_new"))])
    assert rotated.recheck(entry, NOW) == (None, Rejection.REVOKED)
    disabled = KeySet([KeyEntry("good", entry.sha256, enabled=False)])
    assert disabled.recheck(entry, NOW)[1] is Rejection.DISABLED
    assert KeySet(ENTRIES).recheck(entry, NOW) == (entry, None)


def test_upstream_url_and_headers():
    r = router()
    up = r.upstream(r.route("gpt-realtime x/y", None), "gpt-realtime x/y")
    assert up.uri.resource_name == "/v1/realtime?model=gpt-realtime%20x%2Fy"
    assert up.headers == [("Authorization", "Bearer sk-up")]
    for model in ("..", "."):
        with pytest.raises(RouteError, match="dot segment"):
            r.upstream(r.route(model, "pathy"), model)
    with pytest.raises(RouteError, match="control character"):
        r.upstream(r.route("gpt-a", None), "gpt-\r\nx")


def openai_admission(*entries: KeyEntry) -> Admission:
    """OpenAI and ElevenLabs configured, beside `local` and `pathy`."""
    conf = Config(providers={"openai": Provider(secret_env="SECRET"),
                             "elevenlabs": Provider(secret_env="SECRET"),
                             "local": Provider(url="ws://127.0.0.1:9/v1/realtime?model={model}"),
                             "pathy": Provider(url="ws://127.0.0.1:9/x/{model}/y")})
    return admission(keyset=KeySet(list(entries)), router=Router(conf, environ={"SECRET": "sk-up"}))


def test_a_key_with_allowed_models_needs_a_model_to_check():
    """A provider whose URL names no model, reached with a key restricted to some
    models and no model named anywhere: 4003. It went through: nothing was checked."""
    conf = Config(providers={"fixed": Provider(url="ws://127.0.0.1:9/fixed")})
    state = admission(router=Router(conf, environ={}))
    d = decide(upgrade("/v1/realtime/connect?provider=fixed"), state)
    assert isinstance(d, Close)
    assert (d.code, d.reason) == (4003, "the session names no model: not allowed for this key")
    anyone = admission(keyset=KeySet([KeyEntry("any", hash_key(KEY))]), router=Router(conf, environ={}))
    assert isinstance(decide(upgrade("/v1/realtime/connect?provider=fixed"), anyone), Accept)


def test_no_client_chooses_where_a_provider_calls_out():
    """Deepgram's callback (it POSTs the transcripts there) and AssemblyAI's webhooks
    are not client session parameters: only the provider account's owner sets them."""
    conf = Config(providers={"deepgram": Provider(secret_env="SECRET"),
                             "assemblyai": Provider(secret_env="SECRET")})
    state = admission(keyset=KeySet([KeyEntry("any", hash_key(KEY))]),
                      router=Router(conf, environ={"SECRET": "sk-up"}))
    for path, auth, passed in (
        ("/v1/listen?model=nova-3&encoding=linear16&callback=https://x.example/&callback_method=put",
         f"Token {KEY}", (("encoding", "linear16"),)),
        ("/v3/ws?speech_model=u&sample_rate=16000&webhook_url=https://x.example/",
         KEY, (("sample_rate", "16000"),)),
    ):
        d = decide(upgrade(path, key=None, Authorization=auth), state)
        assert isinstance(d, Accept), d
        assert d.query == passed


def test_an_audio_format_parameter_given_twice_is_refused():
    """Both values went to the provider and audio_rate read the last: were the provider
    to read the first (8 kHz mu-law, then sample_rate=48000 last), the session's audio
    seconds, and its audio_seconds budget, would be counted at a sixth of the truth.
    Parameters that repeat by design still pass."""
    conf = Config(providers={"deepgram": Provider(secret_env="SECRET"),
                             "assemblyai": Provider(secret_env="SECRET")})
    state = admission(keyset=KeySet([KeyEntry("any", hash_key(KEY))]),
                      router=Router(conf, environ={"SECRET": "sk-up"}))
    for path, auth, name in (
        ("/v1/listen?model=nova-3&encoding=mulaw&sample_rate=8000&sample_rate=48000", f"Token {KEY}",
         "sample_rate"),
        ("/v1/listen?model=nova-3&encoding=mulaw&encoding=linear16", f"Token {KEY}", "encoding"),
        ("/v1/listen?model=nova-3&channels=1&encoding=linear16&channels=2", f"Token {KEY}", "channels"),
        ("/v3/ws?speech_model=u&sample_rate=8000&sample_rate=16000", KEY, "sample_rate"),
    ):
        d = decide(upgrade(path, key=None, Authorization=auth), state)
        assert isinstance(d, Refuse) and d.response.status_code == 400, (path, d)
        assert d.reason == f"{name} given more than once" and KEY not in d.response.body.decode()
    d = decide(upgrade("/v1/listen?model=nova-3&encoding=linear16&sample_rate=16000&keyterm=a&keyterm=b"
                       "&redact=pci&redact=ssn&keywords=x:2&keywords=y&tag=t1&tag=t2",
                       key=None, Authorization=f"Token {KEY}"), state)
    assert isinstance(d, Accept), d
    assert [v for n, v in d.query if n in ("keyterm", "redact", "keywords", "tag")] == [
        "a", "b", "pci", "ssn", "x:2", "y", "t1", "t2"]


def test_openai_sessions_without_a_model_in_the_url():
    """call_id= and intent=transcription go to openai with the model parameter dropped
    and the parameter forwarded; without them a model-less request stays refused."""
    state = openai_admission(KeyEntry("any", hash_key(KEY)))
    for query, kind in (("call_id=rtc%201", "call"), ("intent=transcription", "transcription")):
        d = decide(upgrade(f"/v1/realtime?{query}"), state)
        assert isinstance(d, Accept) and (d.route.name, d.model, d.modelless) == ("openai", None, kind)
        assert (d.hold is held.transcription_model) == (kind == "transcription")
        up = state.router.upstream(d.route.targets[0], None, d.query)
        assert up.uri.resource_name == f"/v1/realtime?{query}"
        assert up.headers == [("Authorization", "Bearer sk-up")]
    # A model beside them is not the session's (test_native_sdks: ..._with_a_model_...).
    with_model = decide(upgrade("/v1/realtime?model=gpt-realtime&provider=openai&call_id=c"), state)
    assert isinstance(with_model, Accept) and (with_model.model, with_model.modelless) == (None, "call")
    for path, code, reason in (
        ("/v1/realtime", 4004, "no model and no provider given"),
        ("/v1/realtime?intent=quicksilver", 4004, "no model and no provider given"),
        ("/v1/realtime/connect?call_id=c", 4004, "no model and no provider given"),
        ("/v1/realtime?provider=pathy&call_id=c", 4004, "provider 'pathy' needs a model"),
        ("/v1/realtime?provider=elevenlabs&call_id=c", 4004, "provider 'elevenlabs' needs a model"),
        ("/v1/realtime?provider=local&call_id=c", 4004,
         "provider 'local' does not take call_id (add it to its query_params)"),
    ):
        d = decide(upgrade(path), state)
        assert isinstance(d, Close) and (d.code, d.reason) == (code, reason), path
    assert decide(upgrade("/v1/realtime?call_id=a&call_id=b"), state).response.status_code == 400


def test_openai_live_sessions():
    """openai-python's live.connect dials /v1/live/sessions, its model in session.start
    (held); forks and sidebands add a stored session's id. All go to the template's
    /realtime path replaced, without its model parameter; only a sideband's
    graceful_close passes. A provider that cannot drop its model, or speaks no OpenAI,
    gets 4004; a stored session's model cannot be checked: 4003 for a limited key."""
    from conduit_sidecar.metering import METERS
    from conduit_sidecar.providers import meter
    state = openai_admission(KeyEntry("any", hash_key(KEY)))
    r = state.router
    for path, kind, url in (
        ("/v1/live/sessions?model=m&call_id=c", "live", "wss://api.openai.com:443/v1/live/sessions"),
        ("/v1/live/sessions?provider=local", "live", "ws://127.0.0.1:9/v1/live/sessions"),
        ("/v1/live/sessions/sess_1-a/fork", "live_fork",
         "wss://api.openai.com:443/v1/live/sessions/sess_1-a/fork"),
        ("/v1/live/sessions/sess_1/attach?graceful_close=true&x=1", "live_attach",
         "wss://api.openai.com:443/v1/live/sessions/sess_1/attach?graceful_close=true"),
    ):
        d = decide(upgrade(path), state)
        assert isinstance(d, Accept) and (d.model, d.modelless) == (None, kind), (path, d)
        assert (d.hold is held.live_models) == (kind == "live")
        up = r.upstream(d.route.targets[0], None, d.query, d.kept)
        scheme = "wss" if up.uri.secure else "ws"
        assert f"{scheme}://{up.uri.host}:{up.uri.port}{up.uri.resource_name}" == url
        expected = None if kind == "live_attach" else METERS["openai_live"]
        assert meter(d.route.name, d.kept) is expected
    limited = openai_admission(KeyEntry("l", hash_key(KEY), allowed_models=["gpt-live-*"]))
    assert decide(upgrade("/v1/live/sessions"), limited).hold is held.live_models
    for path, admitted, code, reason in (
        ("/v1/live/sessions?provider=pathy", state, 4004, "provider 'pathy' needs a model"),
        ("/v1/live/sessions?provider=elevenlabs", state, 4004, "provider 'elevenlabs' needs a model"),
        ("/v1/live/sessions/s/fork", limited, 4003, "the session names no model: not allowed for this key"),
        ("/v1/live/sessions/s/attach", limited, 4003, "the session names no model: not allowed for this key"),
    ):
        d = decide(upgrade(path), admitted)
        assert isinstance(d, Close) and (d.code, d.reason) == (code, reason), path
    for path in ("/v1/live/sessions/s.1/fork", "/v1/live/sessions/s/other", "/v1/live/session"):
        assert decide(upgrade(path), state).response.status_code == 404


def test_live_session_start_names_its_models():
    start = b'{"type":"session.start","session":{"model":"gpt-live-1","delegation":%s}}'
    assert held.live_models(start % b"null") == ("gpt-live-1",)
    assert held.live_models(start % b'{"type":"responses","responses":{"model":"gpt-5"}}') == (
        "gpt-live-1", "gpt-5")
    assert held.live_models(start % b'{"type":"decisions","decisions":{"model":"d","questions":[]}}') == (
        "gpt-live-1", "d")
    assert held.live_models(b'{"type":"session.update","session":{"model":"x"}}') == ()
    for bad, code in ((b"not json", 1002), (start.replace(b"gpt-live-1", b"") % b"null", 1002),
                      (start % b'{"type":"client","k":"condt_x"}', 4003),
                      (start % b'{"type":"client","k":"\\u0063ondt_x"}', 4003)):
        with pytest.raises(held.Refused) as exc:
            held.live_models(bad)
        assert exc.value.code == code, bad


def test_cumulative_usage_counts_its_rise():
    """OpenAI Live reports the session's seconds so far: 1, 2.5, 2.5, then a lower
    (late) report count 2.5 in all, never less."""
    from conduit_sidecar.metering import METERS, Usage
    decode = METERS["openai_live"].decode
    usage, added = Usage(), []
    for event in (b'{"type":"session.usage.updated","event_id":"e","usage":{"seconds":1}}',
                  b'{"type":"session.usage.updated","event_id":"e","usage":{"seconds":2.5}}',
                  b'{"type":"session.closed","reason":"close_requested","usage":{"seconds":2.5}}',
                  b'{"type":"session.usage.updated","usage":{"seconds":2}}'):
        counts = decode(event)
        assert counts is not None
        added.append(usage.add(counts, cumulative=True)["audio"])
    assert (added, usage.seconds["audio"]) == ([1.0, 1.5, 0.0, 0.0], 2.5)
    assert decode(b'{"type":"session.started","session":{"model":"m"}}') is None


def test_openai_translation_sessions():
    """openai-python's realtime.translations.connect dials /v1/realtime/translations?model=M:
    routed, keyed and checked as /v1/realtime, sent to the template's /realtime path with
    /translations after it. Azure documents no translation path; a URL that does not
    end in /realtime has nowhere to put it: 4004, and neither is failed over to."""
    conf = Config(providers={"openai": Provider(secret_env="SECRET"),
                             "azure": Provider(secret_env="SECRET", resource="r"),
                             "local": Provider(url="ws://127.0.0.1:9/v1/realtime?model={model}",
                                               models=["local-*"]),
                             "pathy": Provider(url="ws://127.0.0.1:9/x/{model}/y")},
                  routes={"gpt-realtime-translate": ["openai", "azure", "local"]})
    r = Router(conf, environ={"SECRET": "sk-up"})
    state = admission(keyset=KeySet([KeyEntry("t", hash_key(KEY), allowed_models=["gpt-*", "local-*"])]),
                      router=r)
    for path, url in (
        ("/v1/realtime/translations?model=gpt-realtime-translate&call_id=c&voice=x",
         "wss://api.openai.com:443/v1/realtime/translations?model=gpt-realtime-translate&call_id=c"),
        ("/v1/realtime/translations?model=local-translate",
         "ws://127.0.0.1:9/v1/realtime/translations?model=local-translate"),
    ):
        d = decide(upgrade(path), state)
        assert isinstance(d, Accept), d
        up = r.upstream(d.route.targets[0], d.model, d.query, d.kept)
        scheme = "wss" if up.uri.secure else "ws"
        assert f"{scheme}://{up.uri.host}:{up.uri.port}{up.uri.resource_name}" == url
        assert up.headers == ([("Authorization", "Bearer sk-up")] if d.route.name == "openai" else [])
    # The subprotocol key form, as on /v1/realtime.
    by_subprotocol = decide(upgrade("/v1/realtime/translations?model=gpt-realtime-translate", key=None,
                                    Sec_WebSocket_Protocol=f"realtime, openai-insecure-api-key.{KEY}"),
                            state)
    assert isinstance(by_subprotocol, Accept) and by_subprotocol.subprotocols == ["realtime"]
    # Failover skips the providers that do not serve the path (Azure here).
    openai = r.routes["openai"]
    assert [f.name for f in r.fallbacks(openai, "gpt-realtime-translate")] == ["azure", "local"]
    kept = decide(upgrade("/v1/realtime/translations?model=gpt-realtime-translate"), state).kept
    assert [f.name for f in r.fallbacks(openai, "gpt-realtime-translate", kept)] == ["local"]
    for path, code, reason in (
        ("/v1/realtime/translations?model=gpt-realtime-translate&provider=azure", 4004,
         "provider 'azure' does not serve /v1/realtime/translations"),
        ("/v1/realtime/translations?model=gpt-x&provider=pathy", 4004,
         "provider 'pathy' does not serve /v1/realtime/translations"),
        ("/v1/realtime/translations?model=other&provider=openai", 4003,
         "model 'other' not allowed for this key"),
        ("/v1/realtime/translations?provider=openai", 4004, "provider 'openai' needs a model"),
        ("/v1/realtime/translations?intent=transcription", 4004, "no model and no provider given"),
    ):
        d = decide(upgrade(path), state)
        assert isinstance(d, Close) and (d.code, d.reason) == (code, reason), path
    assert decide(upgrade("/v1/realtime/translations?model=gpt-realtime-translate", key=None),
                  state).code == 4001
    assert decide(upgrade("/v1/realtime/translations?model=a&model=b"), state).response.status_code == 400
    # Gemini's version is still the client's (and a URL without one is used as it is).
    gemini = Router(Config(providers={"gemini": Provider(secret_env="SECRET")}), environ={"SECRET": "k"})
    d = decide(upgrade("/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContent",
                       key=None, x_goog_api_key=KEY),
               admission(keyset=KeySet([KeyEntry("any", hash_key(KEY))]), router=gemini))
    assert isinstance(d, Accept)
    up = gemini.upstream(d.route.targets[0], None, d.query, d.kept)
    assert up.uri.resource_name.startswith("/ws/google.ai.generativelanguage.v1alpha.GenerativeService")


def test_geminis_ephemeral_token_method_reads_its_token_forms_and_passes_none():
    """BidiGenerateContentConstrained: the key as `Authorization: Token` (google-genai) or
    ?access_token= (@google/genai), `auth_tokens/` dropped; upstream the plain method at
    the client's version. access_token never passes, even if query_params names it."""
    conf = Config(providers={"gemini": Provider(secret_env="SECRET", query_params=["access_token"])})
    gemini = Router(conf, environ={"SECRET": "k"})
    state = admission(keyset=KeySet([KeyEntry("any", hash_key(KEY))]), router=gemini)
    path = "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContentConstrained"
    for request in (upgrade(path, key=None, Authorization=f"Token auth_tokens/{KEY}"),
                    upgrade(f"{path}?access_token=auth_tokens/{KEY}", key=None),
                    upgrade(f"{path}?access_token={KEY}", key=None)):
        d = decide(request, state)
        assert isinstance(d, Accept) and d.key.id == "any" and d.query == ()
        up = gemini.upstream(d.route.targets[0], None, d.query, d.kept)
        assert up.uri.resource_name == (
            "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContent?key=k")
    assert decide(upgrade(path), state).reason == "missing key"  # Bearer is not a token form


def test_a_template_naming_the_model_only_in_a_header_still_gets_an_empty_one():
    r = Router(Config(providers={"hdr": Provider(url="ws://127.0.0.1:9/v1", headers={"X-Model": "{model}"})}))
    up = r.upstream(r.route(None, "hdr").targets[0], None)
    assert (up.uri.resource_name, up.headers) == ("/v1", [("X-Model", "")])


def test_call_id_sessions_need_a_key_without_allowed_models():
    state = openai_admission(KeyEntry("limited", hash_key(KEY), allowed_models=["gpt-*"]))
    d = decide(upgrade("/v1/realtime?call_id=c"), state)
    assert isinstance(d, Close) and d.code == 4003 and "call_id" in d.reason
    # Transcription: judged on the first message (held), not here.
    assert isinstance(decide(upgrade("/v1/realtime?intent=transcription"), state), Accept)


@pytest.mark.parametrize("message,model", [
    (b'{"type":"session.update","session":{"type":"transcription","audio":{"input":'
     b'{"transcription":{"model":"gpt-4o-transcribe"}}}}}', "gpt-4o-transcribe"),
    (b'{"type":"transcription_session.update","session":{"input_audio_transcription":'
     b'{"model":"whisper-1"}}}', "whisper-1"),
    (b'{"type":"session.update","session":{"type":"realtime","audio":{"input":'
     b'{"transcription":{"model":"whisper-1"}}}}}', None),
    (b'{"type":"input_audio_buffer.append","audio":""}', None),
])
def test_the_transcription_model_a_first_message_names(message, model):
    assert held.transcription_model(message) == (() if model is None else (model,))


def test_a_transcription_model_the_provider_names_is_none_if_it_holds_a_secret():
    """A provider's `session.updated` naming, as its transcription model, text that
    holds a secret it was sent (or a virtual key): no model, so it never reaches a
    close reason, the log or a label."""
    from conduit_sidecar import redact
    redact.remember("secret_env TRANSCRIBED", "sk-Zz0Pq8Yy1" + "Pq8" * 6)
    event = (b'{"type":"session.updated","session":{"type":"realtime","audio":{"input":'
             b'{"transcription":{"model":"%s"}}}}}')
    assert held.provider_transcription(event % b"gpt-4o-transcribe") == "gpt-4o-transcribe"
    assert held.provider_transcription(event % b"x-sk-Zz0Pq8Yy1") is None
    assert held.provider_transcription(event % b"x-condt_AbC") is None


@pytest.mark.parametrize("message", [b"not json", b'{"no":"type"}', b'[1]',
                                     b'{"type":"x","y":%s}' % (b"[" * 100_000 + b"]" * 100_000),
                                     b'{"type":"x","y":"\xff"}',  # not UTF-8 (a binary frame)
                                     b'{"type":"transcription_session.update","session":'
                                     b'{"input_audio_transcription":{"model":"a\nb"}}}'])
def test_a_malformed_first_transcription_message_gets_1002(message):
    with pytest.raises(held.Refused) as exc:
        held.transcription_model(message)
    assert exc.value.code == 1002


@pytest.mark.parametrize("message, reason", [
    (b'{"type":"transcription_session.update","session":{"input_audio_transcription":'
     b'{"model":"whisper-1","model":"gpt-4o-transcribe"}}}', "the first message names a member twice"),
    (b'{"type":"session.update","session":{"type":"transcription","audio":{"input":'
     b'{"transcription":{"model":"whisper-1"}}}},"session":{"type":"realtime"}}',
     "the first message names a member twice"),
    # Go's encoding/json matches names in any case, and \u017f (long s) as s.
    (b'{"type":"session.update","session":{"type":"transcription","audio":{"input":'
     b'{"transcription":{"model":"gpt-4o-transcribe","MODEL":"whisper-1"}}}}}',
     "the first message spells 'model' in another case"),
    ('{"type":"transcription_session.update","\u017fession":{"input_audio_transcription":'
     '{"model":"whisper-1"}}}'.encode(), "the first message spells 'session' in another case"),
])
def test_a_transcription_update_read_otherwise_elsewhere_gets_1002(message, reason):
    """msgspec keeps the last of a member named twice and matches names exactly; the
    provider's parser may keep the first, or match them in any case."""
    with pytest.raises(held.Refused) as exc:
        held.transcription_model(message)
    assert (exc.value.code, str(exc.value)) == (1002, reason)



def test_a_number_longer_than_python_converts_is_no_bug():
    """A member holding a number of over 4,300 digits is JSON like any other (msgspec
    reads past it); Python's json, reading the message again for members named twice,
    raised ValueError there: 1011 and a traceback, for a first or a later message."""
    message = (b'{"type":"transcription_session.update","n":%s,"session":'
               b'{"input_audio_transcription":{"model":"whisper-1"}}}' % (b"1" * 5000))
    assert held.transcription_model(message) == ("whisper-1",)
    assert held.later_transcription(message) == ("whisper-1",)


@pytest.mark.parametrize("message, read", [
    (b'{"type":"input_audio_buffer.append","audio":"bW9kZWwgTW9kZWw="}', False),  # "model Model" in base64
    (b'{"type":"session.update","session":{"instructions":"the model"}}', False),
    (b'{"type":"session.update","session":{"audio":{"input":{"transcription":{"model":"x"}}}}}', True),
    (b'{"type":"UpdateSpeak","speak":{"provider":{"MODEL_ID":"x"}}}', True),
    (b'{"type":"x","mod\\u0065l":"y"}', True),                   # an escape could spell it
    (b'{"type":"x","authorization":"Bearer condt_abc"}', True),
])
def test_a_later_message_is_read_when_it_could_name_a_model_or_hold_a_key(message, read):
    assert held.may_name(message) is read

def test_a_public_agent_is_its_keys_without_the_provider_secret():
    owner = KeyEntry("owner", hash_key(KEY), public_agents=["agent_pub"], allowed_providers=["elevenlabs"])
    state = openai_admission(owner)
    d = decide(upgrade("/v1/convai/conversation?agent_id=agent_pub&source=python_sdk", key=None), state)
    assert isinstance(d, Accept) and d.anonymous and d.key is owner and d.model == "agent_pub"
    up = state.router.upstream(d.route.targets[0], d.model, d.query, secret=False)
    assert up.headers == [] and "sk-up" not in up.uri.resource_name
    for agent in ("agent_other", ""):
        d = decide(upgrade(f"/v1/convai/conversation?agent_id={agent}", key=None), state)
        assert isinstance(d, Close) and d.rejection is Rejection.MISSING
    # With a key presented, the session is that key's, with the secret (as before).
    with_key = decide(upgrade("/v1/convai/conversation?agent_id=agent_pub", key=None, xi_api_key=KEY), state)
    assert isinstance(with_key, Accept) and not with_key.anonymous
    # The key's policy holds (the agent id is the model), and its recheck follows the list.
    narrow = KeyEntry("owner", hash_key(KEY), public_agents=["agent_pub"], allowed_models=["agent_other"])
    d = decide(upgrade("/v1/convai/conversation?agent_id=agent_pub", key=None), openai_admission(narrow))
    assert isinstance(d, Close) and d.code == 4003 and d.key is narrow
    assert KeySet([owner]).recheck(owner, NOW, "agent_pub") == (owner, None)
    unlisted = KeyEntry("owner", owner.sha256)
    assert KeySet([unlisted]).recheck(owner, NOW, "agent_pub")[1] is Rejection.REVOKED


def test_two_keys_listing_one_public_agent_is_a_load_error(tmp_path):
    import json

    from conduit_sidecar.keys import KeyWatcher
    path = tmp_path / "keys.json"
    good = {"keys": [{"id": "a", "sha256": hash_key("condt_a"), "public_agents": ["agent_x"]}]}
    path.write_text(json.dumps(good))
    watcher = KeyWatcher(str(path), load_keys(str(path)), lambda _: None)
    watcher.file.changed()
    bad = {"keys": [*good["keys"], {"id": "b", "sha256": hash_key("condt_b"), "public_agents": ["agent_x"]}]}
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"public agent 'agent_x' is listed by key 'a' and key 'b'.*"
                                          r"\$\.keys\[1\]\.public_agents"):
        load_keys(str(path))
    os.utime(path, (1, 1))
    watcher.check()
    assert watcher.keyset.by_agent["agent_x"].id == "a"        # the previous set is kept


def test_a_key_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """open() of a FIFO waits for a writer: a keys_file pointing at one stalled the start,
    or a running sidecar's event loop at its next reload, for as long as none came."""
    import threading
    fifo = tmp_path / "keys.json"
    os.mkfifo(fifo)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_raised(load_keys, str(fifo))), daemon=True)
    reader.start()
    reader.join(10)                     # a guard against the hang, not a timing measure
    assert outcome == [f"{fifo}: cannot read: not a regular file"]


def _raised(call, *args) -> str | None:
    try:
        call(*args)
    except ConfigError as exc:
        return str(exc)
    return None


def test_a_key_file_replaced_while_the_sidecar_starts_is_reloaded_at_the_first_check(tmp_path):
    """The file is read, then replaced (a Secret update) before the watcher exists: the
    watcher starts from the file as it was read, so its first check reloads it. It
    started from the file as it was then, and the revoked key stayed good until some
    later change."""
    import json

    from conduit_sidecar.keys import KeyWatcher
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"id": "old", "sha256": hash_key("condt_old")}]}))
    loaded = load_keys(str(path))
    tmp = tmp_path / "keys.json.tmp"
    tmp.write_text(json.dumps({"keys": [{"id": "new", "sha256": hash_key("condt_new")}]}))
    os.replace(tmp, path)
    changes = []
    watcher = KeyWatcher(str(path), loaded, changes.append)
    watcher.check()
    assert [set(c.by_id) for c in changes] == [{"new"}]
    watcher.check()
    assert len(changes) == 1                                    # once


def test_a_key_file_finished_while_its_half_written_copy_was_read_is_reloaded(tmp_path, monkeypatch):
    """A key file written in place (an editor, `cat > keys.json`) is read half-written:
    invalid, the last good set stays. The writer finishes before the watcher notes the
    file's state after the failure: it noted the finished file as the one that failed,
    and the new keys were never loaded (until some later change)."""
    import json

    from conduit_sidecar import keys as keys_module
    from conduit_sidecar.keys import KeyWatcher
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"id": "old", "sha256": hash_key("condt_old")}]}))
    changes = []
    watcher = KeyWatcher(str(path), load_keys(str(path)), changes.append)
    new = json.dumps({"keys": [{"id": "new", "sha256": hash_key("condt_new")}]})
    with open(path, "w") as f:                                  # in place: the same inode
        f.write(new[:10])

    def read_as_the_writer_finishes(at):
        try:
            return load_keys(at)
        finally:
            with open(path, "a") as f:
                f.write(new[10:])
    monkeypatch.setattr(keys_module, "load_keys", read_as_the_writer_finishes)
    watcher.check()
    assert changes == [None]                                    # the half-written file
    monkeypatch.setattr(keys_module, "load_keys", load_keys)
    watcher.check()
    assert set(changes[-1].by_id) == {"new"}


def test_request_reader_bounds_and_early_bytes():
    reader = RequestReader(1024)
    head = b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\n\r\n"
    assert reader.feed(head[:10]) is None
    request = reader.feed(head[10:] + b"\x81\x00")
    assert request.path == "/v1/realtime" and reader.early == b"\x81\x00"
    # What a client sends with its request (a first frame) is not the request's size.
    frame = b"\x82\x7e\x07\xd0" + b"a" * 2000
    reader = RequestReader(1024)
    assert reader.feed(head + frame).path == "/v1/realtime" and reader.early == frame
    with pytest.raises(BadRequest) as exc:
        RequestReader(1024).feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 2000 + b"\r\n\r\n")
    assert exc.value.status == 431
    with pytest.raises(BadRequest) as exc:
        RequestReader(1024).feed(b"GET / HTTP/1.1\r\nAuthorization: Bearer condt_x\x01\r\n\r\n")
    assert exc.value.status == 400 and "condt_x" not in str(exc.value)


def test_request_reader_parses_header_lines_once_the_head_ends():
    """A peer's header lines stay bytes until the blank line that ends its head (parsed,
    each is several objects); its request line is checked as soon as it is read."""
    head = b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"
    reader = RequestReader(1024)
    assert [reader.feed(head[i:i + 1]) for i in range(len(head) - 1)] == [None] * (len(head) - 1)
    request = reader.feed(head[-1:])
    assert request.headers["Upgrade"] == "websocket" and reader.early == b""
    reader = RequestReader(1024)
    assert reader.feed(b"GET / HTTP/1.1\r\nnot a header\r\nHost: x\r\n") is None
    with pytest.raises(BadRequest) as exc:
        reader.feed(b"\r\n")
    assert exc.value.status == 400
    for end in (b"\n\n", b"\n\r\n"):               # a line without its CR ends a head too
        reader = RequestReader(1024)
        assert reader.feed(b"GET / HTTP/1.1\r\nHost: x") is None
        with pytest.raises(BadRequest) as exc:
            reader.feed(end)
        assert exc.value.status == 400
    with pytest.raises(BadRequest) as exc:
        RequestReader(1024).feed(b"GET / HTTP/2.0\r\nHost: x\r\n")
    assert exc.value.status == 400
    reader = RequestReader(1024)
    assert reader.feed(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 150) is None
    with pytest.raises(BadRequest) as exc:                      # past max_bytes
        reader.feed(b"X: y\r\n" * 150)
    assert exc.value.status == 431


def test_model_labels_are_bounded():
    """Models come from clients: past MODEL_LABELS_MAX of them a new one is labelled
    `other` (one series each would grow without bound), those seen before keep theirs."""
    sidecar = Sidecar(Config(), KeySet([]))
    labels = [sidecar.model_label(f"m{i}") for i in range(MODEL_LABELS_MAX + 1)]
    assert labels[:-1] == [f"m{i}" for i in range(MODEL_LABELS_MAX)] and labels[-1] == "other"
    assert sidecar.model_label("m0") == "m0"


def test_config_precedence_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('listen = "127.0.0.1:1"\n[limits]\nmax_connections = 5\n')
    conf = config_module.load(str(path), overrides={"listen": "127.0.0.1:3"},
                              environ={"CONDUIT_MAX_CONNECTIONS": "7", "CONDUIT_LISTEN": "127.0.0.1:2"})
    assert conf.listen == "127.0.0.1:3" and conf.limits.max_connections == 7
    assert conf.kernel_tls
    path.write_text("kernel_tls = true\n")
    assert not config_module.load(str(path), environ={"CONDUIT_KERNEL_TLS": "0"}).kernel_tls
    path.write_text('[limits]\nmax_connections = 0\n')
    with pytest.raises(ConfigError, match=r"\$\.limits\.max_connections"):
        config_module.load(str(path), environ={})




def test_a_permission_change_alone_is_a_change_only_after_a_failed_read(tmp_path):
    """A key file written while unreadable failed to load; `chmod` then made it
    readable, which changes neither inode, mtime nor size: it was never read again,
    and the sidecar kept the old keys until the next edit (seen on a sidecar without
    CAP_DAC_OVERRIDE). Its ctime changes. After a good read a ctime change alone is
    none: some kubelets re-apply a Secret volume's ownership at every sync."""
    from conduit_sidecar.watch import FileWatch

    path = tmp_path / "keys.json"
    path.write_text("{}")
    watch = FileWatch(str(path))
    path.chmod(0o600)
    assert not watch.changed()
    watch.after_failure(True)
    path.chmod(0o640)
    assert watch.changed() and not watch.changed()
    watch.after_failure(False)
    path.chmod(0o600)
    assert not watch.changed()


def test_a_file_written_in_place_is_a_change(tmp_path):
    """An editor or `>` writes the same inode: its size or its mtime tells the change."""
    from conduit_sidecar.watch import FileWatch

    path = tmp_path / "keys.json"
    path.write_text("{}")
    watch = FileWatch(str(path))
    inode = path.stat().st_ino
    with open(path, "r+") as f:                       # longer
        f.write('{"keys": []}')
    assert path.stat().st_ino == inode
    assert watch.changed() and not watch.changed()
    with open(path, "r+") as f:                       # as long, written later
        f.write('{"keys":[]} ')
    mtime = path.stat().st_mtime_ns
    os.utime(path, ns=(mtime, mtime + 10**9))
    assert watch.changed() and not watch.changed()


def test_memory_is_trimmed_on_a_fall_of_drop_sessions_and_once_more_when_it_ends(monkeypatch):
    """Trimmer: a fall of `drop` sessions from the peak trims, and once the fall is
    over (the count no longer falling) a last trim takes what its last closes freed."""
    import uvloop

    from conduit_sidecar import trim

    trims = []
    monkeypatch.setattr(trim._relay, "malloc_trim", lambda: trims.append(1))

    async def falls():
        trimmer = trim.Trimmer(drop=4)
        for live in range(11):
            trimmer.grew(live)
        return [trimmer.check(live) for live in (10, 9, 6, 5, 5, 5, 4)]

    assert uvloop.run(falls()) == [False, False, True, False, True, False, False]
    assert len(trims) == 2


def test_memory_is_trimmed_once_drop_sessions_ended_under_a_light_load(monkeypatch):
    """Sessions replaced a few at a time never fall `drop` below a peak, yet leave
    free heap between live objects: once `drop` have ended since the last trim, a
    check with fewer than `drop` live and the count not rising trims."""
    import uvloop

    from conduit_sidecar import trim

    trims = []
    monkeypatch.setattr(trim._relay, "malloc_trim", lambda: trims.append(1))

    async def churn():
        trimmer = trim.Trimmer(drop=4)
        checks = []
        trimmer.grew(1)
        trimmer.grew(2)
        checks.append(trimmer.check(2))  # none ended
        for live in (2, 2, 2, 2, 3):
            trimmer.grew(live)  # four replaced, one more
        checks.append(trimmer.check(3))  # four ended, but the count is rising
        trimmer.grew(4)
        checks.append(trimmer.check(4))
        checks.append(trimmer.check(4))  # steady, but `drop` are live
        checks.append(trimmer.check(3))  # a fifth ended
        checks.append(trimmer.check(3))  # none since
        return checks

    assert uvloop.run(churn()) == [False, False, False, False, True, False]
    assert len(trims) == 1


def test_a_falls_end_puts_the_spare_handles_in_uvloops_free_lists_for_the_bursts():
    """After a burst, uvloop's handle free lists hold the burst's last handles, which
    keep its pymalloc arenas (docs/benchmarks.md, "Memory"). When the fall ends, the
    handles made at rest take their place, and the next check takes them back: the
    same objects, so the burst's went back to pymalloc."""
    import asyncio

    import uvloop

    from conduit_sidecar import trim

    async def burst_and_fall():
        loop = asyncio.get_running_loop()
        trimmer = trim.Trimmer(drop=4)
        trimmer.check(0)
        assert trimmer.spare is not None
        spare = {id(h) for h in trimmer.spare}
        burst = [loop.call_soon(trim._noop) for _ in range(1000)]
        burst += [loop.call_later(3600, trim._noop) for _ in range(1000)]
        for handle in burst:
            handle.cancel()
        del burst, handle
        await asyncio.sleep(0)  # the loop drops them: the free lists are the burst's
        trimmer.grew(10)
        assert trimmer.check(5) and trimmer.check(5)  # the fall, then its end
        assert trimmer.spare is None
        await asyncio.sleep(0)
        trimmer.check(5)
        # all but the handle that runs this step, out of the free list meanwhile
        assert len({id(h) for h in trimmer.spare} - spare) <= 1

    uvloop.run(burst_and_fall())


def test_a_key_file_expiry_without_a_zone_is_refused(tmp_path):
    """The schema says it (msgspec's tz=True): a naive time is no instant."""
    path = tmp_path / "keys.json"
    path.write_text('{"keys": [{"id": "a", "sha256": "' + "0" * 64 + '", "expires_at": "2027-01-01T00:00:00"}]}')
    with pytest.raises(ConfigError) as exc:
        load_keys(str(path))
    assert str(exc.value) == f"{path}: Expected `datetime` with a timezone component - at `$.keys[0].expires_at`"


@pytest.mark.parametrize("entry, at", [
    ({"id": "team\n", "sha256": "0" * 64}, "id"),      # logged and labelled with it
    ({"id": "team", "sha256": "0" * 64 + "\n"}, "sha256"),  # matched no key, ever
    ({"id": "team", "sha256": "0" * 64, "public_agents": ["agent_a\n"]}, "public_agents[0]"),
])
def test_a_key_id_or_hash_ending_in_a_newline_is_refused(tmp_path, entry, at):
    """The patterns ended in $, which also matches before a final newline."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [entry]}))
    with pytest.raises(ConfigError, match=re.escape(f"at `$.keys[0].{at}`")):
        load_keys(str(path))


def test_a_hash_in_capitals_is_refused(tmp_path):
    """hash_key gives lower-case hex; a hash written in capitals (PowerShell's
    Get-FileHash, `| tr a-z A-Z`) would load and match no key, ever: refused by name."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"id": "team", "sha256": hash_key(KEY).upper()}]}))
    with pytest.raises(ConfigError, match=re.escape("at `$.keys[0].sha256`")):
        load_keys(str(path))


def test_the_readme_shows_the_real_defaults():
    """The README's config examples give each default as its value (except where a
    comment says it is an example): they must be the Structs' defaults."""
    import pathlib
    import re
    import tomllib

    import msgspec

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    shown: dict = {}
    for block in re.findall(r"```toml\n(.*?)```", readme, re.S):
        for name, value in tomllib.loads(block).items():
            if isinstance(value, dict) and name in shown:
                shown[name] = {**shown[name], **value}
            else:
                shown.setdefault(name, value)
    defaults = msgspec.to_builtins(config_module.Config())
    examples = {"providers", "prices", "routes", "allowed_origins"}
    for name, value in shown.items():
        if name in examples:
            continue
        if name == "tls":
            assert value["listen"] == config_module.TLS().listen
        elif name == "state":  # an example of a Redis set-up: its other fields are defaults
            for field in set(value) - {"backend", "url", "password_file"}:
                assert value[field] == defaults["state"][field], field
        elif isinstance(value, dict):
            assert value == {k: defaults[name][k] for k in value}, name
        else:
            assert value == defaults[name], name

def _doc_blocks(lang: str):
    """(doc name and line, text) of each ```lang block in the README and docs/*.md."""
    import pathlib

    root = pathlib.Path(__file__).parent.parent
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        for m in re.finditer(rf"```{lang}\n(.*?)```", text, re.S):
            yield f"{doc.name}:{text.count(chr(10), 0, m.start()) + 1}", m.group(1)


def test_the_docs_config_examples_load(tmp_path):
    """Each TOML example in the README and docs, as a user would paste it, loads as
    `check-config` loads it (a route naming a provider the block did not set up was
    an error nobody saw). Its /etc/conduit files are made, as a deployment has them."""
    seen = 0
    for where, block in _doc_blocks("toml"):
        for path in set(re.findall(r'"/etc/conduit/([^"]+)"', block)):
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text("x")
        conf = tmp_path / "c.toml"
        conf.write_text(block.replace('"/etc/conduit/', f'"{tmp_path}/'))
        try:
            Router(config_module.load(str(conf), environ={}))
        except ConfigError as exc:
            pytest.fail(f"{where}: {exc}")
        seen += 1
    assert seen >= 10


def test_the_docs_key_file_examples_load(tmp_path):
    """The key file and key entries the README and docs show (the `//` notes of a
    `jsonc` one and `...` hashes aside) are valid key files: a renamed field fails here."""
    seen = 0
    for where, block in _doc_blocks("jsonc?"):
        if '"sha256"' not in block:
            continue
        block = re.sub(r"\s+//[^\n]*", "", block)
        block = re.sub(r'"sha256": "[^"]*"', f'"sha256": "{hash_key(KEY)}"', block)
        data = json.loads(block)
        path = tmp_path / "keys.json"
        path.write_text(json.dumps(data if "keys" in data else {"keys": [data]}))
        try:
            load_keys(str(path))
        except ConfigError as exc:
            pytest.fail(f"{where}: {exc}")
        seen += 1
    assert seen >= 3


def test_the_tests_the_docs_name_exist():
    """`test_x.py::test_name` in the README and docs (hardening.md's table cites one per
    fix) names a test that is there: two had been renamed under their citations."""
    import pathlib

    root = pathlib.Path(__file__).parent.parent
    sources: dict[str, str] = {}
    for path in [*(root / "tests").glob("test_*.py"), *(root / "benchmarks").glob("test_*.py")]:
        sources[path.name] = sources.get(path.name, "") + path.read_text()
    cited = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for file, name in re.findall(r"(test_\w+\.py)::\s*(test_\w+)", doc.read_text()):
            cited.append(name)
            assert re.search(rf"def {name}\b", sources.get(file, "")), f"{doc.name}: {file}::{name}"
    assert len(cited) > 100


def test_config_errors_name_the_variable_or_flag_that_set_the_value(tmp_path):
    """A bad value from the environment or a flag: the file does not hold it (it was
    named, and the user looked there in vain)."""
    path = tmp_path / "c.toml"
    path.write_text('listen = "127.0.0.1:1"\n[limits]\nmax_connections = 5\n')
    with pytest.raises(ConfigError) as exc:
        config_module.load(str(path), environ={"CONDUIT_MAX_CONNECTIONS": "0"})
    assert str(exc.value) == "$CONDUIT_MAX_CONNECTIONS: Expected `int` >= 1 - at `$.limits.max_connections`"
    with pytest.raises(ConfigError) as exc:
        config_module.load(str(path), overrides={"listen": "nonsense"}, environ={})
    assert str(exc.value) == "--listen: expected HOST:PORT, got 'nonsense' - at `$.listen`"
    with pytest.raises(ConfigError) as exc:
        config_module.load(str(path), environ={"CONDUIT_LOG_LEVEL": "verbose"})
    assert str(exc.value).startswith("$CONDUIT_LOG_LEVEL: log_level must be")
    path.write_text("[limits]\nmax_connections = 0\n")  # the file's own value: the file
    with pytest.raises(ConfigError, match=f"^{path}: "):
        config_module.load(str(path), environ={"CONDUIT_DRAIN_SECONDS": "3"})


@pytest.mark.parametrize("text, says", [
    # tls.py takes both as given (it asserts them): the CA needs a place and an output.
    ('[tls]\nself_signed = true\nca_out = "/tmp/ca.pem"\n', "self_signed needs ca_out and state_dir"),
    ('[tls]\nself_signed = true\nstate_dir = "/tmp/s"\n', "self_signed needs ca_out and state_dir"),
    # An upgrade request is read whole before it is judged: 1 MiB per pending handshake.
    ("[limits]\nmax_request_bytes = 1048577\n", "at `$.limits.max_request_bytes`"),
    # Renewed every third of it: under 3 s, a renewal a second or more often per pod.
    ('[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:1"\nlease_seconds = 2.9\n',
     "at `$.state.lease_seconds`"),
])
def test_config_bounds_are_refused_by_name(tmp_path, text, says):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(says)):
        config_module.load(str(path), environ={})


def test_a_log_level_is_read_in_any_case(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('log_level = "WARNING"\n')
    assert config_module.load(str(path), environ={}).log_level == "WARNING"


def test_a_table_only_variables_made_is_named_by_them(tmp_path):
    """The file holds no [tls]; `CONDUIT_TLS_SELF_SIGNED=0` (taken for "TLS off") or a
    certificate without its key made one, refused as a whole (`$.tls`): the error named
    the file, where the user looked for a [tls] in vain."""
    path = tmp_path / "c.toml"
    path.write_text('listen = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError) as exc:
        config_module.load(str(path), environ={"CONDUIT_TLS_SELF_SIGNED": "0"})
    assert str(exc.value).startswith("$CONDUIT_TLS_SELF_SIGNED: [tls] needs either cert_file")
    with pytest.raises(ConfigError) as exc:
        config_module.load(str(path), environ={"CONDUIT_TLS_CERT_FILE": "/c.pem",
                                               "CONDUIT_TLS_LISTEN": "127.0.0.1:2"})
    assert str(exc.value).startswith("$CONDUIT_TLS_LISTEN, $CONDUIT_TLS_CERT_FILE: [tls] needs")
    path.write_text('[tls]\ncert_file = "/c.pem"\n')  # the file's [tls]: the file
    with pytest.raises(ConfigError, match=f"^{path}: \\[tls\\] needs"):
        config_module.load(str(path), environ={"CONDUIT_TLS_LISTEN": "127.0.0.1:2"})


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("YES", True), ("on", True),
                                       ("0", False), ("false", False), ("no", False), ("Off", False)])
def test_boolean_variables_read_on_and_off(value, on):
    assert config_module.load(None, environ={"CONDUIT_KERNEL_TLS": value}).kernel_tls is on


def test_a_boolean_variable_that_is_no_boolean_is_refused():
    """Was off: `CONDUIT_KERNEL_TLS=enabled` turned kernel TLS off, silently."""
    with pytest.raises(ConfigError) as exc:
        config_module.load(None, environ={"CONDUIT_KERNEL_TLS": "enabled"})
    assert str(exc.value) == "$CONDUIT_KERNEL_TLS: not a valid kernel_tls: 'enabled'"


def package_imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports, read from the
    source (so imports under TYPE_CHECKING count too)."""
    import ast
    import pathlib

    import conduit_sidecar
    root = pathlib.Path(conduit_sidecar.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[:len(package) - node.level + 1])
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                if node.module is None:
                    edges.update(".".join([*base, a.name]).strip(".") for a in node.names)
                else:
                    edges.add(target.strip("."))
    return graph


def test_the_mock_speaks_every_catalogued_provider():
    """`demo --provider` offers the catalogue (cli does not import the mock for it)."""
    from conduit_sidecar.mock import SHAPES
    from conduit_sidecar.providers import TEMPLATES

    assert sorted(SHAPES) == sorted(TEMPLATES)


def test_layers_point_one_way():
    """No import cycle among the package's modules, not even through imports made only
    for types; server and cli sit on top (only commands import them)."""
    graph = package_imports()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(name):], name]))
        if name in done or name not in graph:
            return
        for target in graph[name]:
            visit(target, [*path, name])
        done.add(name)

    for name in graph:
        visit(name, [])
    for name, targets in graph.items():
        if name not in ("cli", "demo", "__main__"):
            assert not {"server", "cli"} & targets, name


@pytest.mark.parametrize("provider, query, rate", [
    ("deepgram", (("encoding", "mulaw"), ("sample_rate", "8000")), 8000),
    ("deepgram", (("encoding", "linear16"), ("sample_rate", "16000"), ("channels", "2")), 64000),
    ("deepgram", (("encoding", "linear32"), ("sample_rate", "16000")), 64000),
    # Deepgram bills each channel of a multichannel stream: 2 s a second of stereo.
    ("deepgram", (("encoding", "linear16"), ("sample_rate", "16000"), ("channels", "2"),
                  ("multichannel", "true")), 32000),
    ("deepgram", (), None),                                   # a container: not known
    ("deepgram", (("encoding", "opus"), ("sample_rate", "48000")), None),
    ("deepgram", (("encoding", "linear16"), ("sample_rate", "lots")), None),
    ("assemblyai", (("sample_rate", "16000"),), 32000),       # pcm_s16le by default
    ("assemblyai", (("encoding", "pcm_mulaw"), ("sample_rate", "8000")), 8000),
    ("openai", (("encoding", "mulaw"),), None),               # [audio]'s format
])
def test_a_sessions_audio_rate_comes_from_the_format_its_query_names(provider, query, rate):
    from conduit_sidecar.providers import audio_rate
    assert audio_rate(provider, query) == rate


def test_no_failover_to_a_provider_whose_first_message_the_session_did_not_hold():
    """The session's route decides whether its first message is held and its models
    checked (Gemini's setup; Deepgram's agent Settings, after its Welcome). A route
    without that hold failed over to such a provider: an openai session of a key with
    allowed_models went to deepgram_agent, whose Settings then named any model."""
    conf = Config(
        providers={name: Provider(secret_env="SECRET") for name in ("openai", "deepgram_agent", "gemini")}
        | {"mine": Provider(url="ws://127.0.0.1:9/v1/agent/converse")},
        routes={"gpt-*": ["openai", "deepgram_agent", "gemini", "mine"],
                "agent-*": ["deepgram_agent", "mine", "gemini"],
                "gemini-*": ["gemini", "mine"]},
    )
    r = Router(conf, environ={"SECRET": "sk-up"})
    assert [f.name for f in r.fallbacks(r.routes["openai"], "gpt-x")] == ["mine"]
    # A held route keeps its fallbacks of the same kind and those of the user's.
    assert [f.name for f in r.fallbacks(r.routes["deepgram_agent"], "agent-x")] == ["mine"]
    assert [f.name for f in r.fallbacks(r.routes["gemini"], "gemini-x")] == ["mine"]


def test_origins_as_browsers_send_them_are_taken(tmp_path):
    """The check on allowed_origins refuses only entries no browser's Origin matches."""
    origins = ["https://app.example.com", "http://localhost:5173", "http://[::1]:3000",
               "http://app.example.com:443", "https://app.example.com:8443", "null",
               "chrome-extension://abcdefghijklmnopabcdefghijklmnop"]
    path = tmp_path / "c.toml"
    path.write_text(f"allowed_origins = {json.dumps(origins)}\n")
    assert config_module.load(str(path), environ={}).allowed_origins == origins


def test_a_provider_ca_file_is_read_as_a_bundle_is_written(tmp_path):
    """The CA file is read once, bounded (routing.MAX_CA_BYTES), and handed to OpenSSL
    as text: a bundle whose comments name an issuer outside ASCII (Mozilla's do) still
    loads, while an empty file, one with no certificate and one past the bound are
    each named for what they are."""
    from conduit_sidecar import tls
    from conduit_sidecar.routing import MAX_CA_BYTES
    key = tls.new_key()
    ca = tls.pem(tls.certificate(key, name="Test CA", days=1, ca=True))
    files = {"bundle": "# Issuer: CN=F\u0151tan\u00fas\u00edtv\u00e1ny\n".encode() + ca, "empty": b"",
             "text": b"no certificate here\n", "huge": ca + b"#" * MAX_CA_BYTES}
    outcomes = {}
    system = router().ssl_context(None).cert_store_stats()["x509_ca"]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        try:
            outcomes[name] = router().ssl_context(str(tmp_path / name)).cert_store_stats()["x509_ca"] - system
        except RouteError as exc:
            outcomes[name] = exc.detail
    assert outcomes == {"bundle": 1,
                        "empty": f"ca_file {tmp_path / 'empty'}: no PEM certificates",
                        "text": f"ca_file {tmp_path / 'text'}: no PEM certificates",
                        "huge": f"ca_file {tmp_path / 'huge'}: larger than 1 MiB"}


def test_a_config_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Notepad saves UTF-8 with a byte-order mark; the sidecar refused such a file with
    "Invalid statement", naming nothing the user could see in it."""
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xef\xbb\xbf" + 'listen = "127.0.0.1:7"\n'.encode())
    assert config_module.load(str(path), environ={}).listen == "127.0.0.1:7"


def test_redact_hides_virtual_keys_and_runs_of_a_provider_secret():
    """Close reasons a peer wrote (conduit_sidecar.redact): a virtual key whole or cut,
    a provider secret whole, cut at either end, or next to another, each one `***`; a
    reason that holds none is returned as it is."""
    from conduit_sidecar import redact
    first, second = "sk-proj-" + "Ab3" * 20, "AIzaSyD-" + "9xZ" * 10
    redact.remember("secret_file /a", "sk-old-" + "Qq7" * 10)
    redact.remember("secret_file /a", first)  # a rotation: the one before is still redacted
    redact.remember("secret_env B", second)
    assert redact.redact(f"invalid key {first}.") == "invalid key ***."
    assert redact.redact(f"bad {first[:14]}") == "bad ***"
    assert redact.redact(f"bad {first[-9:]} and {second}{first[:20]}!") == "bad *** and ***!"
    assert redact.redact("bye condt_AbC-_9 and condt_") == "bye *** and ***"
    reason = "invalid_request_error: bad event"
    assert redact.redact(reason) is reason
    assert redact.redact("sk-old-Qq7Qq7") == "***"
    redact.remember("secret_file /a", "sk-new-" + "Zz5" * 10)  # two rotations: the oldest is forgotten
    assert redact.redact("sk-old-Qq7Qq7") == "sk-old-Qq7Qq7" and redact.redact(first[:12]) == "***"
    third = "gsk_0123456789abcdefXYZ"
    redact.remember("secret_env C", third)
    redact.remember("secret_env C", "gsk_rotated_" + "Mm4" * 8)
    redact.remember("secret_env C", "gsk_rotated_" + "Mm4" * 8)  # read again: no rotation
    # Eight characters, the shortest run, at either end of the secret before.
    assert redact.redact(f"{third[:8]} {third[-8:]} {third[-7:]}") == f"*** *** {third[-7:]}"
    redact.remember("secret_env D", "S7x!q2")  # shorter than a run: redacted whole
    assert redact.redact("auth=Bearer S7x!q2, S7x!q") == "auth=Bearer ***, S7x!q"



def test_misspelt_names_only_near_settings_and_no_service_variable():
    """config.misspelt: a typo of $CONDUIT_CONFIG too; a Service's variable near a
    setting's name (a Service `conduit-tls-listen`) is none; a name not near enough
    gets no guess."""
    env = {"CONDUIT_CONFIG": "/c.toml", "CONDUIT_CONFG": "/c.toml", "CONDUIT_TLS_LISTEN_PORT": "tcp://10.0.0.1:443",
           "CONDUIT_TLS_PORT_FILE": "/p", "CONDUIT_TLS_CA_DIR": "/d"}
    assert config_module.misspelt(env, set()) == [
        "$CONDUIT_CONFG sets nothing; did you mean $CONDUIT_CONFIG?",
        "$CONDUIT_TLS_PORT_FILE sets nothing; did you mean $CONDUIT_TLS_CERT_FILE?"]

class _Ended:
    """A session the loops below have seen, and that has ended since."""

    __slots__ = ("relay", "__weakref__")

    def __init__(self):
        self.relay = None


def test_the_poll_keeps_no_ended_session_alive():
    """Sidecar._poll looped over the live sessions in its own frame: the last one it
    saw stayed alive (with the pymalloc arena it lies in) until a poll saw another,
    i.e. for good after a burst. Each poll here: `ticks` (the trimmer's check)."""
    import asyncio
    import weakref

    async def scenario():
        sidecar = Sidecar(Config(keys_poll_seconds=0.1), KeySet([]))
        ticks: asyncio.Queue[int] = asyncio.Queue()

        class Watcher:
            def check(self):
                pass

        class Trimmer:
            def check(self, live):
                ticks.put_nowait(live)

        sidecar.watcher, sidecar.trimmer = Watcher(), Trimmer()  # type: ignore[assignment]
        sidecar.recheck_keys = lambda: None  # type: ignore[method-assign]  # (needs a key)
        session = _Ended()
        sidecar.sessions.add(session)  # type: ignore[arg-type]
        poll = asyncio.create_task(sidecar._poll())
        assert await ticks.get() == 1
        sidecar.sessions.clear()
        ended = weakref.ref(session)
        del session
        assert await ticks.get() == 0
        poll.cancel()
        return ended() is None

    assert asyncio.run(scenario())


def test_an_upstream_built_again_holds_the_secret_read_now():
    # Router.upstream reuses the URL and headers it built for the same target, model,
    # query and path: a rotated secret must still reach the next session's headers.
    environ = {"SECRET": "sk-up"}
    conf = Config(providers={"local": Provider(url="ws://127.0.0.1:9/v1/realtime?model={model}",
                                               headers={"Authorization": "Bearer {secret}"},
                                               secret_env="SECRET", models=["gpt-*"])})
    r = Router(conf, environ=environ)
    target = r.routes["local"].targets[0]
    first = r.upstream(target, "gpt-a", (("voice", "x"),))
    assert r.upstream(target, "gpt-a", (("voice", "x"),)) == first
    environ["SECRET"] = "sk-rotated"
    assert r.upstream(target, "gpt-a", (("voice", "x"),)).headers == [("Authorization", "Bearer sk-rotated")]
    from conduit_sidecar.redact import redact  # what it sent, redacted from a close reason
    assert redact("bye sk-rotated") == "bye ***"
    environ["SECRET"] = "sk-\r\nx"
    with pytest.raises(RouteError, match="control character"):
        r.upstream(target, "gpt-a", (("voice", "x"),))
    environ["SECRET"] = "sk-up"
    assert r.upstream(target, "gpt-b", (("voice", "x"),)).uri.resource_name == "/v1/realtime?model=gpt-b&voice=x"
    assert r.upstream(target, "gpt-a", (("voice", "x"),)) == first
    assert r.upstream(target, "gpt-a", secret=False).headers == []
    # Built before with the secret, a session of no key still gets none; another query its own.
    assert r.upstream(target, "gpt-a").headers and r.upstream(target, "gpt-a", secret=False).headers == []
    assert r.upstream(target, "gpt-a", (("voice", "y"),)).uri.resource_name.endswith("voice=y")
    from conduit_sidecar.providers import Kept
    translations = Kept(at="/v1/realtime", text="/v1/realtime/translations")
    translated = r.upstream(target, "gpt-a", kept=translations)
    assert translated.uri.resource_name == "/v1/realtime/translations?model=gpt-a"
    for i in range(300):  # clients' models: 256 kept
        r.upstream(target, f"gpt-{i}")
    assert len(r._upstreams) == 256
    for unusable in ("", "sk-\u2019"):  # a header cannot carry it: refused as a file's is
        environ["SECRET"] = unusable
        with pytest.raises(RouteError, match="secret unavailable"):
            r.upstream(target, "gpt-c")
    wss = Router(Config(providers={"p": Provider(url="wss://127.0.0.1:9/")}))
    assert all(wss.upstream(wss.routes["p"].targets[0], None).ssl for _ in range(2))


def test_an_unusable_secret_file_is_read_and_warned_of_once_per_change(tmp_path):
    secret = tmp_path / "key"
    secret.write_text("sk-first\n")
    conf = Config(providers={"p": Provider(url="ws://127.0.0.1:9/", secret_file=str(secret),
                                           headers={"Authorization": "Bearer {secret}"})})
    r = Router(conf)
    told: list[str] = []
    r.on_secret_reload = told.append
    spec = r.routes["p"].targets[0].spec
    assert r.secret(spec) == "sk-first"
    secret.write_text("\n")
    assert [r.secret(spec) for _ in range(2)] == ["sk-first"] * 2 and told == ["invalid"]


def test_a_query_is_read_as_parse_qs_reads_it():
    import itertools
    import random
    import urllib.parse

    cases = ["", "&", "=", "a", "a=", "=x", "a=b=c", "a=1&a=2&b=", "a=1;b=2", "model=gpt&&provider=x",
             "a=%20b", "a+b=c+d", "k=%ff", "k=é&é=k", "a=1&b&c=3", "x=%2", "&&a=1&&"]
    rng = random.Random(17)
    cases += ["".join(rng.choice("ab=&;é+%2f") for _ in range(rng.randrange(12))) for _ in range(2000)]
    cases += ["".join(p) for p in itertools.product("a=&", repeat=5)]
    for raw in cases:
        try:
            expected = urllib.parse.parse_qs(raw, strict_parsing=False, errors="strict")
        except UnicodeDecodeError:
            with pytest.raises(UnicodeDecodeError):
                parse_query(raw)
            continue
        assert parse_query(raw) == expected, raw


def test_a_request_path_with_a_dot_segment_is_refused():
    from conduit_sidecar.providers import BadPath, normalise_path

    for target in ("/v1/./realtime", "/v1/../realtime?model=x", "/..", "/v1/%2e%2E/x", "//./v1", "/v1/realtime/."):
        with pytest.raises(BadPath, match="dot segments"):
            normalise_path(target)
    for target in ("/v1/realtime.x?model=a.b", "/v1/...", "/v1/.x/y", "/v1/realtime?model=.."):
        assert normalise_path(target) == ("/" + target.partition("?")[0].lstrip("/"), target.partition("?")[2])


@pytest.mark.parametrize("case", ["expires", "cancelled", "expires-and-cancelled", "ends"])
def test_an_attempts_deadline_ends_as_asyncio_timeout_does(case):
    # upstream._Deadline stands in for `async with asyncio.timeout(...)` in _attempt:
    # the same outcome in each case, and the task's cancellation count put back.
    from conduit_sidecar.upstream import _Deadline

    async def timed(block, ours: bool):
        loop = asyncio.get_running_loop()
        if not ours:
            async with asyncio.timeout(0.01 if case == "expires" else 10) as timeout:
                await block(timeout)
            return
        deadline = _Deadline(loop, 0.01 if case == "expires" else 10)
        try:
            await block(deadline)
        except BaseException as exc:
            deadline.end(exc)
            raise
        deadline.end(None)
        assert deadline.timer.cancelled()

    async def block(timer):
        task = asyncio.current_task()
        if case == "cancelled":
            task.cancel()
        elif case == "expires-and-cancelled":  # the time is up, and the client leaves, in one turn
            loop = asyncio.get_running_loop()
            if isinstance(timer, _Deadline):
                timer.timer.cancel()
                loop.call_soon(timer._expire)
            else:
                timer.reschedule(loop.time())
            loop.call_soon(task.cancel)
        await asyncio.sleep(0 if case == "ends" else 10)

    async def outcome(ours: bool):
        try:
            await timed(block, ours)
            result = "ended"
        except TimeoutError:
            result = "timeout"
        except asyncio.CancelledError:
            result = "cancelled"
        return result, asyncio.current_task().cancelling()

    async def both():
        return [await asyncio.create_task(outcome(ours)) for ours in (False, True)]

    theirs, ours = asyncio.run(both())
    assert ours == theirs
    assert ours[0] == {"expires": "timeout", "ends": "ended"}.get(case, "cancelled")


def test_tallies_and_spreads_expose_what_prometheus_clients_own_families_would():
    """The sidecar counts in plain numbers (metrics.Tally, Spread) and prometheus-client
    exposes them: the text a scrape gets is the one its Counter and Histogram would
    give for the same calls, series in the same order, an unlabelled histogram's
    zeros before any observation included."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from conduit_sidecar.metrics import Spread, Tally

    bounds = (0.005, 0.01, 0.5, 1, 10, float("inf"))
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = Tally(ours, "t_closes", "Closes.", ("side", "code"))
    amounts = Tally(ours, "t_cost", "Cost.", ("key",))
    spread = Spread(ours, "t_connect", "Connects.", ("provider",), bounds)
    plain = Spread(ours, "t_duration", "Durations.", (), bounds)
    counter = Counter("t_closes", "Closes.", ["side", "code"], registry=theirs)
    cost = Counter("t_cost", "Cost.", ["key"], registry=theirs)
    histogram = Histogram("t_connect", "Connects.", ["provider"], buckets=bounds, registry=theirs)
    unlabelled = Histogram("t_duration", "Durations.", buckets=bounds, registry=theirs)
    assert generate_latest(ours) == generate_latest(theirs)  # nothing counted yet
    for side, code in (("client", "1000"), ("upstream", "1011"), ("client", "1000"), ("client", "4xxx")):
        tally.inc(side, code)
        counter.labels(side, code).inc()
    for key, usd in (("a", 0.25), ("b", 1e-6), ("a", 3)):
        amounts.add(usd, key)
        cost.labels(key).inc(usd)
    for provider, seconds in (("openai", 0.004), ("openai", 0.005), ("deepgram", 0.2), ("openai", 11.0),
                              ("openai", 1), ("deepgram", 0.0101)):
        spread.observe(seconds, provider)
        histogram.labels(provider).observe(seconds)
        plain.observe(seconds * 100)
        unlabelled.observe(seconds * 100)
    text = generate_latest(ours)
    assert text == generate_latest(theirs)
    assert b't_connect_bucket{le="0.005",provider="openai"} 2.0' in text  # a bound is its own bucket's
