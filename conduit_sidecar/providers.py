"""The provider catalogue: per built-in provider, its upstream template, the paths its
own SDKs dial, where they put the API key, which client query parameters pass, and
how its usage events are metered.

handshake asks `native(path)` which provider serves a path and `presented_key` where
the key is; routing fills the template; server meters with `meter(provider, kept, query)`. Adding a
provider is one entry here.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Literal

import msgspec

from .config import Provider
from .metering import METERS, Meter

__all__ = [
    "ACCOUNT_SUBPROTOCOLS",
    "BUILTIN",
    "KeyForm",
    "Kept",
    "NativePath",
    "Template",
    "TEMPLATES",
    "audio_rate",
    "bare_path",
    "dialect",
    "meter",
    "modelless",
    "native",
    "normalise_path",
    "presented_key",
    "speaks_openai",
    "takes",
]


class KeyForm(msgspec.Struct, frozen=True):
    """One place a provider's SDKs put the API key.

    header: `name` is the header; `schemes` the accepted schemes ("" = the bare value).
    query: `name` is the parameter. subprotocol: `name` ending in "." is a prefix the key
    follows (OpenAI); otherwise the key is the protocol offered right after `name`
    (Deepgram's `token, KEY`), and `name` itself is what the 101 may select. `strip`: a
    prefix dropped from the value when present (see GEMINI_TOKEN_KEYS).
    """

    where: Literal["header", "query", "subprotocol"]
    name: str
    schemes: tuple[str, ...] = ("",)
    strip: str = ""


class Template(msgspec.Struct, frozen=True):
    spec: Provider  # upstream URL and headers (how the secret is sent)
    keys: tuple[KeyForm, ...]
    query: tuple[str, ...] = ()  # client session parameters that pass (allow-list)
    model_in_setup: bool = False  # the model is named in the first client message
    # Deepgram's agent: the provider speaks first (Welcome), which clients may wait for,
    # and the client's first message (Settings) names the models.
    settings_after_welcome: bool = False
    # The event dialect its clients read (policy.notice): the shape of the event a
    # session ended by a limit gets before its close; "" none (the close alone).
    notice: str = ""


class Kept(msgspec.Struct, frozen=True):
    """The part of a native path that goes upstream: `text` in place of the first match
    of the pattern `at` in the template URL up to its query (Gemini's API version for the
    template's; OpenAI's `/realtime/translations` for its `/realtime`; Deepgram's
    `/v2/listen`, `/v1/speak` or `/v2/speak` for its `/v1/listen`; ElevenLabs'
    text-to-speech path, voice id included, or its realtime speech-to-text path, for
    its `/v1/convai/conversation`).

    `builtins`: the built-in providers that serve the path (None: all); another
    built-in cannot (Azure documents no translation path), a provider of the user's can
    if its URL matches. `required`: a URL `at` does not match cannot serve the path;
    else that URL is used as it is (a Gemini URL of the user's naming no version).
    `model`: the query parameter that names the model upstream in place of the
    template's `...={model}` one (ElevenLabs' `model_id` for its `agent_id`), left out
    when the session names no model; only URLs that name the model as nothing but a
    query parameter's value can serve the path (Route.serves). `model_required`: the
    provider refuses a session without it (Scribe's `model_id`), so the sidecar does
    first (4004, as for a template that needs a model)."""

    at: str
    text: str
    builtins: tuple[str, ...] | None = None
    required: bool = True
    model: str | None = None
    model_required: bool = False
    notice: str | None = None  # the path's event dialect (Template.notice); None: the template's
    # The path's usage events (a metering.METERS entry, "" none); None: the provider's.
    meter: str | None = None


class NativePath(msgspec.Struct, frozen=True):
    provider: str | None  # None: chosen as on the sidecar's own paths (provider=, routes)
    model_param: str | None = None  # the query parameter naming the model
    kept: Kept | None = None  # the part of the client's path kept upstream
    # The path's own client query allow-list, in place of the template's (None: the
    # template's); the user's `query_params` add to either.
    query: tuple[str, ...] | None = None
    # The path's own key forms, in place of the template's (None: the template's).
    keys: tuple[KeyForm, ...] | None = None
    # The provider also reads a key from the first client message (ElevenLabs'
    # text-to-speech), or would pass one on (an OpenAI Live fork's tools): it is held,
    # and refused if it holds a virtual key (held.keyless).
    key_in_first: bool = False
    # An OpenAI session that never names its model in the URL: its kind, as
    # `modelless` gives it for /v1/realtime (the model label until one is named).
    modelless: str | None = None


BEARER = KeyForm("header", "Authorization", ("bearer",))
OPENAI_KEYS = (BEARER, KeyForm("subprotocol", "openai-insecure-api-key."))
# OpenAI's browser form of its OpenAI-Organization and OpenAI-Project headers: which
# account the provider secret acts (and is billed) for is the operator's choice, as
# those headers are, so these never go upstream nor into the 101 on any path.
ACCOUNT_SUBPROTOCOLS = ("openai-organization.", "openai-project.")
DEEPGRAM_KEYS = (
    KeyForm("header", "Authorization", ("token", "bearer")),
    KeyForm("subprotocol", "token"),
    KeyForm("subprotocol", "bearer"),
)
# Gemini's ephemeral-token forms (BidiGenerateContentConstrained: google-genai's
# `Authorization: Token`, @google/genai's `?access_token=`). Both SDKs take that path
# only for a key starting `auth_tokens/`, so an app hands them `auth_tokens/` plus its
# virtual key; the prefix is dropped.
GEMINI_TOKEN_KEYS = (
    KeyForm("header", "Authorization", ("token",), strip="auth_tokens/"),
    KeyForm("query", "access_token", strip="auth_tokens/"),
)

TEMPLATES: dict[str, Template] = {
    "openai": Template(
        Provider(
            url="wss://api.openai.com/v1/realtime?model={model}", headers={"Authorization": "Bearer {secret}"}
        ),
        OPENAI_KEYS,
        query=("call_id", "intent"),  # the sessions that name no model (see `modelless`)
        notice="openai",
    ),
    "azure": Template(
        Provider(
            url="wss://{resource}.openai.azure.com/openai/v1/realtime?model={model}",
            headers={"api-key": "{secret}"},
        ),
        (KeyForm("header", "api-key"), BEARER),
        notice="openai",
    ),
    "gemini": Template(
        Provider(
            url="wss://generativelanguage.googleapis.com/ws/google.ai.generativelanguage."
            "v1beta.GenerativeService.BidiGenerateContent?key={secret}",
            headers={},
        ),
        (KeyForm("header", "x-goog-api-key"), KeyForm("query", "key")),
        model_in_setup=True,
        notice="gemini",
    ),
    "elevenlabs": Template(
        Provider(
            url="wss://api.elevenlabs.io/v1/convai/conversation?agent_id={model}",
            headers={"xi-api-key": "{secret}"},
        ),
        (KeyForm("header", "xi-api-key"),),
        query=(
            "conversation_signature",
            "conversation_id",
            "branch_id",
            "environment",
            "source",
            "version",
            "version_id",
        ),
    ),
    "deepgram": Template(
        Provider(
            url="wss://api.deepgram.com/v1/listen?model={model}", headers={"Authorization": "Token {secret}"}
        ),
        DEEPGRAM_KEYS,
        # Not callback nor callback_method: a client does not choose where the provider
        # calls out (Deepgram would POST the session's transcripts there).
        query=(
            "channels",
            "detect_entities",
            "diarize",
            "diarize_model",
            "dictation",
            "encoding",
            "endpointing",
            "extra",
            "interim_results",
            "keyterm",
            "keywords",
            "language",
            "language_hint",  # deepgram-sdk (Python) 7.x sends it on /v1/listen too
            "mip_opt_out",
            "multichannel",
            "numerals",
            "profanity_filter",
            "punctuate",
            "redact",
            "replace",
            "sample_rate",
            "search",
            "smart_format",
            "tag",
            "utterance_end_ms",
            "vad_events",
            "version",
        ),
        notice="deepgram_listen",
    ),
    # Deepgram's voice agent, on its own host; the same key as /v1/listen. Its models
    # are named in the Settings message, none in the URL.
    "deepgram_agent": Template(
        Provider(
            url="wss://agent.deepgram.com/v1/agent/converse", headers={"Authorization": "Token {secret}"}
        ),
        DEEPGRAM_KEYS,
        settings_after_welcome=True,
        notice="deepgram",
    ),
    "assemblyai": Template(
        Provider(
            url="wss://streaming.assemblyai.com/v3/ws?speech_model={model}",  # required in v3
            headers={"Authorization": "{secret}"},
        ),
        (KeyForm("header", "Authorization"), KeyForm("query", "token")),
        # Not webhook_* nor llm_gateway: a client does not choose where the provider calls
        # out; nor customer_support_audio_capture (AssemblyAI keeps the session's audio):
        # what the provider retains is the operator's choice (query_params), not an app's.
        query=(
            "sample_rate",
            "encoding",
            "format_turns",
            "end_of_turn_confidence_threshold",
            "min_end_of_turn_silence_when_confident",
            "min_turn_silence",
            "max_turn_silence",
            "keyterms_prompt",
            "language_detection",
            "language_code",
            "language_codes",
            "vad_threshold",
            "inactivity_timeout",
            "prompt",
            "filter_profanity",
            "agent_context",
            "interruption_delay",
            "turn_left_pad_ms",
            "session_heartbeat",
            "acknowledge_silence",
            "speaker_labels",
            "speaker_labels_revision_interval_ms",
            "max_speakers",
            "domain",
            "voice_focus",
            "voice_focus_threshold",
            "continuous_partials",
            "include_partial_turns",
            "redact_pii",
            "redact_pii_policies",
            "redact_pii_sub",
            "mode",
        ),
        notice="assemblyai",
    ),
}
BUILTIN: dict[str, Provider] = {name: t.spec for name, t in TEMPLATES.items()}

# The paths each provider's SDKs dial (observed), and where the model is named.
_GEMINI = "/ws/google.ai.generativelanguage.{}.GenerativeService.BidiGenerateContent"
_GEMINI_VERSION = r"(?<=generativelanguage\.)v1\w*(?=\.)"
# Deepgram's Flux and streaming TTS sockets, on the host of its /v1/listen. Flux takes
# no callback; Speak's REST callback and callback_method stay out (see "deepgram"), and
# Flux TTS (/v2/speak) takes them on its REST form only.
_FLUX_QUERY = (
    "eager_eot_threshold",
    "encoding",
    "eot_threshold",
    "eot_timeout_ms",
    "keyterm",
    "language_hint",
    "mip_opt_out",
    "numerals",
    "profanity_filter",
    "redact",
    "sample_rate",
    "tag",
)
_SPEAK_QUERY = ("bit_rate", "container", "encoding", "mip_opt_out", "sample_rate", "speed", "tag")
_SPEAK_V2_QUERY = ("encoding", "expressivity", "mip_opt_out", "sample_rate", "speed", "tag")
_NATIVE: dict[str, NativePath] = {
    # OpenAI's translation sessions (openai-python's realtime.translations.connect), on
    # the providers /v1/realtime reaches whose URL path ends in /realtime.
    "/v1/realtime/translations": NativePath(
        None, "model", Kept(r"/realtime$", "/realtime/translations", builtins=("openai",))
    ),
    # OpenAI's Live sessions (openai-python's live.connect): the model is named in the
    # first message (session.start), none in the URL; no client parameter passes.
    "/v1/live/sessions": NativePath(
        None,
        kept=Kept(r"/realtime$", "/live/sessions", builtins=("openai",), meter="openai_live"),
        query=(),
        modelless="live",
    ),
    "/openai/v1/realtime": NativePath("azure", "model"),
    "/openai/realtime": NativePath("azure", "deployment"),
    **{
        _GEMINI.format(v): NativePath("gemini", kept=Kept(_GEMINI_VERSION, v, required=False))
        for v in ("v1", "v1beta", "v1alpha")
    },
    # The ephemeral-token method, with a virtual key for the token: upstream it is the
    # template's own method (BidiGenerateContent, the API version kept) with its secret,
    # the setup held and checked as there.
    **{
        _GEMINI.format(v) + "Constrained": NativePath(
            "gemini", kept=Kept(_GEMINI_VERSION, v, required=False), keys=GEMINI_TOKEN_KEYS
        )
        for v in ("v1", "v1beta", "v1alpha")
    },
    # Lyria's realtime music (google-genai's live.music), the same setup held: upstream
    # the template's method is replaced, the API version kept. Its messages have no
    # goAway (nor usage: not metered).
    **{
        _GEMINI.format(v).replace("Content", "Music"): NativePath(
            "gemini",
            kept=Kept(
                _GEMINI_VERSION + r"\.GenerativeService\.BidiGenerateContent$",
                f"{v}.GenerativeService.BidiGenerateMusic",
                builtins=("gemini",),
                notice="",
            ),
        )
        for v in ("v1", "v1beta", "v1alpha")
    },
    "/v1/listen": NativePath("deepgram", "model"),
    # Speak v1 has no error event: its SDK would read one as a Flushed.
    **{
        path: NativePath(
            "deepgram", "model", Kept(r"/v1/listen$", path, builtins=("deepgram",), notice=notice), query
        )
        for path, query, notice in (
            ("/v2/listen", _FLUX_QUERY, "deepgram"),
            ("/v1/speak", _SPEAK_QUERY, ""),
            ("/v2/speak", _SPEAK_V2_QUERY, "deepgram"),
        )
    },
    "/v1/agent/converse": NativePath("deepgram_agent"),
    "/v3/ws": NativePath("assemblyai", "speech_model"),
    "/v1/convai/conversation": NativePath("elevenlabs", "agent_id"),
    # ElevenLabs' realtime speech-to-text (Scribe), on the agents' host; model_id is
    # required there.
    "/v1/speech-to-text/realtime": NativePath(
        "elevenlabs",
        "model_id",
        Kept(
            r"/v1/convai/conversation$",
            "/v1/speech-to-text/realtime",
            builtins=("elevenlabs",),
            model="model_id",
            model_required=True,
            notice="scribe",
        ),
        # Not token (ElevenLabs' single-use tokens): credentials are the sidecar's.
        query=(
            "audio_format",
            "commit_strategy",
            "vad_silence_threshold_secs",
            "vad_threshold",
            "min_speech_duration_ms",
            "min_silence_duration_ms",
            "language_code",
            "secondary_languages",
            "include_timestamps",
            "include_language_detection",
            "keyterms",
            "no_verbatim",
            "entity_detection",
            "entity_redaction",
            "entity_redaction_mode",
            "transcript_edit",
            "filter_background_audio",
            "enable_logging",
        ),
    ),
}
# Native paths with a variable segment, matched whole; their Kept text expands the
# pattern's groups. ElevenLabs' text-to-speech sockets keep the client's voice id
# (strictly alphanumeric, as ElevenLabs' ids are: nothing to encode) and name the
# model in `model_id`, which ElevenLabs defaults when it is absent.
_NATIVE_PATTERNS: tuple[tuple[str, re.Pattern[str], NativePath], ...] = (
    (
        "/v1/text-to-speech/",  # a literal prefix: most paths are no match at one compare
        re.compile(r"/v1/text-to-speech/([A-Za-z0-9]{1,64})/(stream-input|multi-stream-input)"),
        NativePath(
            "elevenlabs",
            "model_id",
            Kept(
                r"/v1/convai/conversation$",
                r"/v1/text-to-speech/\1/\2",
                builtins=("elevenlabs",),
                model="model_id",
            ),
            # Not authorization nor single_use_token: credentials are the sidecar's.
            query=(
                "output_format",
                "language_code",
                "enable_logging",
                "enable_ssml_parsing",
                "optimize_streaming_latency",
                "inactivity_timeout",
                "sync_alignment",
                "auto_mode",
                "apply_text_normalization",
                "seed",
            ),
            key_in_first=True,
        ),
    ),
    # OpenAI Live's sockets on a stored session, by its id (live.forks.connect,
    # live.sideband.connect): the model is the session's, chosen where it was started,
    # so it cannot be checked (a key limited to models is refused, as on /v1/realtime
    # with call_id). A sideband reflects its session's usage, which is metered on the
    # session's own socket: not again. A fork's first message, its session.start, may
    # give the delegated backend tools (an MCP server's `authorization`), as
    # live.connect()'s does: held for a virtual key. A sideband's may come much later.
    *(
        (
            "/v1/live/sessions/",
            re.compile(rf"/v1/live/sessions/([A-Za-z0-9_-]{{1,128}})/({kind})"),
            NativePath(
                None,
                kept=Kept(r"/realtime$", r"/live/sessions/\1/\2", builtins=("openai",), meter=meter),
                query=query,
                key_in_first=first,
                modelless=f"live_{kind}",
            ),
        )
        for kind, query, meter, first in (
            ("fork", (), "openai_live", True),
            ("attach", ("graceful_close",), "", False),
        )
    ),
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadPath(ValueError):
    """A request path the sidecar will not route (the message says why)."""


def bare_path(target: str) -> str:
    """The path of a request target, leading slashes collapsed (the Node Gemini SDK
    sends `//ws/...`), nothing checked: see normalise_path."""
    return "/" + target.partition("?")[0].lstrip("/")


def normalise_path(target: str) -> tuple[str, str]:
    """(path, query) of a request target, the path as bare_path gives it; dot segments
    and control characters are refused."""
    path, query = bare_path(target), target.partition("?")[2]
    decoded = urllib.parse.unquote(path)
    if _CONTROL.search(decoded) or _CONTROL.search(urllib.parse.unquote(query)):
        raise BadPath("control characters in the request target")
    if "." in decoded and any(seg in (".", "..") for seg in decoded.split("/")):
        raise BadPath("dot segments in the request path")
    return path, query.partition("#")[0]


def native(path: str) -> NativePath | None:
    """The provider whose SDKs dial `path`, if any, with the part of it kept upstream."""
    found = _NATIVE.get(path)
    if found is not None:
        return found
    for prefix, pattern, where in _NATIVE_PATTERNS:
        m = pattern.fullmatch(path) if path.startswith(prefix) else None
        if m is not None and where.kept is not None:
            return msgspec.structs.replace(
                where, kept=msgspec.structs.replace(where.kept, text=m.expand(where.kept.text))
            )
    return None


def speaks_openai(provider: str) -> bool:
    """OpenAI's realtime events: OpenAI, Azure, and the providers the user defines."""
    return provider in ("openai", "azure") or provider not in TEMPLATES


def dialect(provider: str, kept: Kept | None) -> str:
    """The event dialect a session's client reads (Template.notice): its path's, else
    its provider's; a provider the user defines speaks OpenAI's (speaks_openai)."""
    if kept is not None and kept.notice is not None:
        return kept.notice
    template = TEMPLATES.get(provider)
    return template.notice if template is not None else "openai"


def modelless(query: dict[str, list[str]]) -> str | None:
    """What an OpenAI session that names no model in its URL is: "call" (`call_id=`: a
    call created elsewhere, its model chosen there) or "transcription"
    (`intent=transcription`: the model is named in the first session update); None for
    anything else. The kind is also the session's model label until a model is named."""
    if query.get("call_id"):
        return "call"
    if query.get("intent") == ["transcription"]:
        return "transcription"
    return None


def meter(provider: str, kept: Kept | None = None, query: tuple[tuple[str, str], ...] = ()) -> Meter | None:
    """How a session reports usage (None: it reports none we read): by its path's
    events (Kept.meter), else its provider's (Deepgram's per channel where its `query`
    asks for multichannel); providers the user defines are taken to speak OpenAI's
    events."""
    if kept is not None and kept.meter is not None:
        return METERS.get(kept.meter)
    if _multichannel(provider, dict(query)):
        return METERS["deepgram_multichannel"]
    return METERS.get(provider) if provider in TEMPLATES else METERS["openai"]


# Bytes per sample of the raw encodings Deepgram's and AssemblyAI's query name.
_SAMPLE_BYTES = {"linear32": 4, "linear16": 2, "pcm_s16le": 2, "mulaw": 1, "alaw": 1, "pcm_mulaw": 1}
# The query parameters audio_rate reads: each given once (handshake.decide), so the
# provider and the sidecar cannot read different values of one.
AUDIO_FORMAT = ("encoding", "sample_rate", "channels", "multichannel")


def audio_rate(provider: str, query: tuple[tuple[str, str], ...]) -> int | None:
    """Bytes per billed second of the binary audio a Deepgram or AssemblyAI session
    streams, by the raw format its query names (AssemblyAI's default is pcm_s16le). None
    where the format is `[audio]`'s, or not raw (Deepgram without `encoding`: a
    container). Deepgram bills each channel of a `multichannel=true` stream: a second
    of it is a second per channel."""
    if provider not in ("deepgram", "assemblyai"):
        return None
    q = dict(query)
    width = _SAMPLE_BYTES.get(q.get("encoding", "pcm_s16le" if provider == "assemblyai" else ""))
    try:
        rate, channels = int(q.get("sample_rate", "16000")), int(q.get("channels", "1"))
    except ValueError:
        return None
    if width is None or not (0 < rate <= 384_000 and 0 < channels <= 32):
        return None
    return width * rate * (1 if _multichannel(provider, q) else channels)


def _multichannel(provider: str, query: dict[str, str]) -> bool:
    return provider == "deepgram" and query.get("multichannel") == "true"


def takes(kept: Kept | None, provider: str, url: str) -> bool:
    """Whether a target of `provider` at the template `url` serves a native path that
    keeps `kept` of the client's path (see Kept)."""
    if kept is None:
        return True
    if provider in TEMPLATES and kept.builtins is not None and provider not in kept.builtins:
        return False
    return not kept.required or re.search(kept.at, url.partition("?")[0]) is not None


def upstream_path(url: str, kept: Kept | None) -> str:
    """The template URL with the part of the client's path `kept` keeps in its path
    (takes() says whether the template can take it)."""
    if kept is None:
        return url
    path, sep, query = url.partition("?")
    return re.sub(kept.at, lambda _: kept.text, path, count=1) + sep + query


def presented_key(
    forms: tuple[KeyForm, ...], headers, query: dict[str, list[str]], offered: list[str]
) -> tuple[str | None, set[str], bool]:
    """(key, key-bearing subprotocols, whether a form held two different keys) for a
    request. `forms` are in order of precedence (a header wins over a query parameter
    or subprotocol); a form that holds two different values gives no key. Every
    key-bearing subprotocol is reported, used or not, so that none goes upstream or
    into the 101."""
    key = None
    carriers: set[str] = set()
    two = False
    for form in forms:
        found: list[str] = []
        if form.where == "header":
            for value in headers.get_all(form.name):
                scheme, sep, token = value.strip().partition(" ")
                if "" in form.schemes and not sep:
                    found.append(value.strip())
                elif sep and scheme.lower() in form.schemes and token.strip():
                    found.append(token.strip())
        elif form.where == "query":
            found.extend(query.get(form.name, []))
        elif form.name.endswith("."):
            for p in offered:
                if p[: len(form.name)].lower() == form.name:  # browsers keep case
                    carriers.add(p)
                    found.append(p[len(form.name) :])
        else:  # each `name, KEY` pair: a second one's key must not go upstream either
            for i, p in enumerate(offered[:-1]):
                if p == form.name:
                    carriers.add(offered[i + 1])
                    found.append(offered[i + 1])
        values = {v.removeprefix(form.strip) for v in found if v}
        if key is None and len(values) == 1:
            key = values.pop()
        two = two or len(values) > 1
    return key, carriers, two
