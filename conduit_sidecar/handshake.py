"""The client handshake as a pure function: request + loaded state -> decision.

No I/O here. The HTTP request is parsed by websockets' sans-I/O parser and checked
by its ServerProtocol (Upgrade, Connection, Sec-WebSocket-Key/Version, Origin).
Auth and routing failures complete the upgrade and then close with a 4xxx code,
because browser clients cannot read an HTTP status and the documented clients
decide on reconnecting from the close code.
"""

from __future__ import annotations

import datetime as dt
import functools
import http
import urllib.parse
from collections.abc import Callable

import msgspec
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHeader
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import Origin

from . import held
from ._relay import CloseCode
from .keys import KEY_PREFIX, KeyEntry, KeySet, Rejection
from .providers import (
    ACCOUNT_SUBPROTOCOLS,
    AUDIO_FORMAT,
    OPENAI_KEYS,
    TEMPLATES,
    BadPath,
    Kept,
    KeyForm,
    modelless,
    native,
    normalise_path,
    presented_key,
    speaks_openai,
)
from .routing import Route, RouteError, Router

__all__ = [
    "Accept",
    "Admission",
    "Close",
    "PATHS",
    "Refuse",
    "admit",
    "decide",
    "key_misplaced",
    "parse_query",
    "refuse",
]

# The sidecar's own paths: the provider comes from `provider=` or the model routes, the
# key in OpenAI's forms. Each provider's own SDK paths are in the catalogue (providers).
PATHS = ("/v1/realtime/connect", "/v1/realtime")
_KEY_STEM = KEY_PREFIX.rstrip("_")  # a key in a raw query, its "_" escaped or not


class Admission(msgspec.Struct, frozen=True):
    """What the process knows when a request arrives: everything `decide` reads."""

    keyset: KeySet
    router: Router
    now: dt.datetime
    live_per_key: dict[str, int]
    at_capacity: bool
    draining: bool
    allowed_origins: list[str] | None
    # signature -> (the hash of the key it stands for, the deployment that signed it), or None
    signed: Callable[[str], tuple[str, str] | None] = lambda _: None


class Refuse(msgspec.Struct, frozen=True):
    """Answer with an HTTP error; no upgrade."""

    response: Response
    reason: str


class Close(msgspec.Struct, frozen=True):
    """Upgrade (101), then close with `code`."""

    response: Response
    code: int
    reason: str
    key: KeyEntry | None = None
    rejection: Rejection | None = None  # for 4001: why the key was refused


class Accept(msgspec.Struct, frozen=True):
    """Open the upstream; on success answer with `response` (plus its subprotocol)."""

    response: Response
    key: KeyEntry
    route: Route
    model: str | None
    subprotocols: list[str] | None
    query: tuple[tuple[str, str], ...] = ()  # client parameters for the upstream URL
    kept: Kept | None = None  # the part of the client's path kept upstream (providers.Kept)
    # The models are named in the first client message, held and read by this (the
    # session's label first; none: no model named).
    hold: Callable[[bytes], tuple[str, ...]] | None = None
    # An OpenAI session that names no model in its URL ("call", "transcription"; see
    # providers.modelless): the upstream URL names none either, and this is the model
    # label until a model is named.
    modelless: str | None = None
    # Admitted for a key's public agent with no credential presented: sent upstream
    # without the provider secret.
    anonymous: bool = False
    # A signed URL's session: only the deployment that signed it takes the signature,
    # so it goes there and nowhere else.
    deployment: str | None = None
    # The upstream opens first and its first message reaches the client before the
    # hold (Deepgram's agent: clients may wait for its Welcome before their Settings).
    greeted: bool = False
    # Later client messages may name models (or hold a key) too: each text message is
    # read whole and withheld until this has read it (held.later_*).
    later: Callable[[bytes], tuple[str, ...]] | None = None


def _rejected(response: Response, why: Rejection, key: KeyEntry | None = None) -> Close:
    return Close(response, CloseCode.AUTH_FAILED, why.value, key, why)


def refuse(status: int, text: str) -> Refuse:
    body = (text + "\n").encode()
    headers = Headers(
        [
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", "text/plain; charset=utf-8"),
        ]
    )
    return Refuse(Response(status, http.HTTPStatus(status).phrase, headers, body), text)


def admit(
    entry: KeyEntry | None,
    router: Router,
    now: dt.datetime,
    model: str | None,
    provider: str | None,
    without_model: bool = False,
) -> Route | tuple[int, str, Rejection | None]:
    """The route for a key's request, or (close code, reason, 4001 cause) why not."""
    why = (
        Rejection.UNKNOWN
        if entry is None
        else Rejection.DISABLED
        if not entry.enabled
        else Rejection.EXPIRED
        if entry.expired(now)
        else None
    )
    if why is not None:
        return CloseCode.AUTH_FAILED, why.value, why
    assert entry is not None  # no entry: why is UNKNOWN
    try:
        route = router.route(model, provider, without_model)
    except RouteError as exc:
        return exc.code, str(exc), None
    if not entry.allows_provider(route.name):
        return CloseCode.FORBIDDEN, f"provider {route.name!r} not allowed for this key", None
    if model is not None and not entry.allows_model(model):
        return CloseCode.FORBIDDEN, f"model {model!r} not allowed for this key", None
    return route


@functools.lru_cache(maxsize=4)
def _checker(allowed_origins: tuple[str, ...] | None) -> ServerProtocol:
    """One ServerProtocol per origin list, shared by every request: `accept` only
    reads its settings (and records the last failure, read right after it). A new
    one per request cost a UUID, a logger lookup and a parser generator that forms a
    reference cycle: garbage left for the cyclic GC, which grew the heap by megabytes
    under a stream of handshakes."""
    origins = None if allowed_origins is None else [*map(Origin, allowed_origins), None]
    return ServerProtocol(origins=origins, select_subprotocol=lambda _, __: None)


def _offered(request: Request) -> list[str]:
    return [
        p.strip()
        for v in request.headers.get_all("Sec-WebSocket-Protocol")
        for p in v.split(",")
        if p.strip()
    ]


def key_misplaced(query: dict[str, list[str]], forms: tuple[KeyForm, ...]) -> bool:
    """Whether a virtual key is in a query parameter that none of `forms` reads."""
    read = {f.name for f in forms if f.where == "query"}
    return any(
        KEY_PREFIX in name or (name not in read and any(KEY_PREFIX in v for v in values))
        for name, values in query.items()
    )


@functools.cache
def _key_params(forms: tuple[KeyForm, ...]) -> frozenset[str]:
    """The query parameters a key is read from: they never pass upstream, even if
    `query_params` names one (Router refuses only the template's there, not a path's own)."""
    return frozenset(f.name for f in forms if f.where == "query")


def parse_query(raw: str) -> dict[str, list[str]]:
    """`urllib.parse.parse_qs(raw, errors="strict")`: parameters without a value are
    dropped. A query with nothing to unescape (most: `model=...&provider=...`) is split
    here: parse_qs cost 27 k instructions a call (2% of a session)."""
    if "%" in raw or "+" in raw:
        return urllib.parse.parse_qs(raw, strict_parsing=False, errors="strict")
    query: dict[str, list[str]] = {}
    for pair in raw.split("&"):
        name, _, value = pair.partition("=")
        if value:
            values = query.get(name)
            if values is None:
                query[name] = [value]
            else:
                values.append(value)
    return query


def decide(request: Request, state: Admission) -> Refuse | Close | Accept:
    try:
        path, raw_query = normalise_path(request.path)
    except BadPath as exc:
        return refuse(400, str(exc))
    where = native(path)
    if path not in PATHS and where is None:
        return refuse(404, f"not found: use {PATHS[0]}")
    if KEY_PREFIX in path:
        # A pattern path's segment (an OpenAI Live session id) is kept in the provider's
        # URL: a key pasted there would go to the provider.
        return refuse(400, "a virtual key in the request path")
    # A native path with no provider of its own is routed as the sidecar's paths are.
    fixed = where.provider if where is not None else None
    forms: tuple[KeyForm, ...] = OPENAI_KEYS if fixed is None else TEMPLATES[fixed].keys
    if where is not None and where.keys is not None:
        forms = where.keys  # the path's own (Gemini's ephemeral-token method)

    try:
        query = parse_query(raw_query)
    except UnicodeDecodeError:
        return refuse(400, "query is not valid UTF-8")
    # A virtual key in a parameter no key is read from (swapped parameters, a key pasted
    # as the model) would reach log lines, metric labels and the provider's URL. (The
    # raw query first: a search in C, where the parameters' check costs 15 k
    # instructions, 1.6% of a session.)
    if (_KEY_STEM in raw_query or "%" in raw_query) and key_misplaced(query, forms):
        return refuse(400, "a virtual key in a query parameter that holds none")
    model_param = "model" if where is None else where.model_param
    for name in ("model", "provider", model_param, *(("call_id", "intent") if path == PATHS[1] else ())):
        values = query.get(name, []) if name else []
        if len(values) > 1:
            return refuse(400, f"{name} given more than once")
        if values and len(values[0]) > held.MAX_MODEL_CHARS:  # they reach log lines and labels
            return refuse(400, f"{name} longer than {held.MAX_MODEL_CHARS} characters")
    # Both values would go upstream while audio_rate reads one: a provider reading the
    # other would stream audio that the session's seconds (and budgets) count wrong.
    for name in AUDIO_FORMAT:
        if len(query.get(name, ())) > 1:
            return refuse(400, f"{name} given more than once")
    model = query.get(model_param, [None])[0] if model_param else None
    provider = query.get("provider", [None])[0] if fixed is None else fixed
    # OpenAI's sessions without a model in the URL: a call (call_id=) or a transcription
    # session; the Live paths name none ever.
    kind = modelless(query) if path == PATHS[1] else where.modelless if where else None
    if kind is not None and not speaks_openai(provider or "openai"):
        kind = None  # another provider's sessions need their model: refused as before
    if kind is not None:
        provider = provider or "openai"
        # A `model=` beside call_id or intent (openai-python sends both if given both,
        # LiveKit's STT both to a gateway) is not the session's: a call's model is the
        # call's, a transcription's is named in its first message, and OpenAI would take
        # it as a conversation session's. It is dropped, not checked.
        model = None

    offered = _offered(request)
    key, carriers, two_keys = presented_key(forms, request.headers, query, offered)
    # A virtual key offered in a form this path does not read (another provider's, or
    # a case it does not match) is still a key: it goes neither upstream nor into the 101;
    # nor does an OpenAI account subprotocol (ACCOUNT_SUBPROTOCOLS).
    if offered:
        carriers.update(p for p in offered if KEY_PREFIX in p or p.lower().startswith(ACCOUNT_SUBPROTOCOLS))
    passed = [p for p in offered if p not in carriers]
    # Deepgram's browser form `token, KEY`: the 101 selects `token`; the provider,
    # which gets its key by header, is not offered it.
    upstream_offer = [p for p in passed if p not in _announcers(forms)]

    # Answer the client with one of its own subprotocols, never the key one.
    # allowed_origins guards against other sites' pages; clients that send no Origin
    # (SDKs, servers) are not browsers and pass.
    ws = _checker(None if state.allowed_origins is None else tuple(state.allowed_origins))
    response = ws.accept(_without_key_subprotocols(request, passed, bool(carriers)))
    if response.status_code != 101:
        return _refused(response, ws.handshake_exc)
    if passed:
        response.headers["Sec-WebSocket-Protocol"] = passed[0]

    if state.draining or state.at_capacity:
        # Its line names the key if it is one that would be admitted (a hash's lookup;
        # a key holder's line is logged every time, a line of no key a few a second).
        holder = state.keyset.lookup(key) if key is not None else None
        if holder is not None and (not holder.enabled or holder.expired(state.now)):
            holder = None
        state_of = "is draining" if state.draining else "at its connection limit"
        return Close(response, CloseCode.AT_CAPACITY, f"sidecar {state_of}: try again later", holder)

    # Signed URLs and public agents are ElevenLabs' agents' (convai), not its TTS's.
    agents = path == "/v1/convai/conversation"
    signature = query.get("conversation_signature", [""])[0]
    anonymous = False
    deployment = None
    if key is None and agents and signature:
        # A signed URL the sidecar handed out carries no key: it stands for the key
        # it was issued to.
        issued = state.signed(signature)
        if issued is None:
            return _rejected(response, Rejection.SIGNATURE)
        key_hash, deployment = issued
        entry = state.keyset.by_hash.get(key_hash)
        if entry is None:  # rotated or removed since it signed
            return _rejected(response, Rejection.REVOKED)
    elif key is None and agents and model in state.keyset.by_agent:
        # A public agent: ElevenLabs' SDK sends no credential at all. The key that lists
        # the agent owns the session, which goes upstream without the provider secret.
        entry, anonymous = state.keyset.by_agent[model], True
    elif key is None:
        return _rejected(response, Rejection.TWO_KEYS if two_keys else Rejection.MISSING)
    else:
        entry = state.keyset.lookup(key)
    kept = where.kept if where is not None else None
    # A path whose model parameter is optional upstream (ElevenLabs' TTS `model_id`)
    # may name none, as OpenAI's call and transcription sessions may.
    optional = kind is not None or (kept is not None and kept.model is not None)
    admitted = admit(entry, state.router, state.now, model, provider, without_model=optional)
    if not isinstance(admitted, Route):
        code, reason, why = admitted
        return Close(response, code, reason, entry, why)
    route = admitted
    assert entry is not None  # admit refuses a missing entry
    if not route.serves(kept):
        return Close(response, CloseCode.NO_ROUTE, f"provider {route.name!r} does not serve {path}", entry)
    if model is None and kept is not None and kept.model_required:
        return Close(response, CloseCode.NO_ROUTE, f"provider {route.name!r} needs a model", entry)
    if kind == "call" and entry.allowed_models is not None:
        # The call was created elsewhere: no model can be checked.
        return Close(
            response, CloseCode.FORBIDDEN, "call_id sessions name no model: not allowed for this key", entry
        )
    named_by = {"call": "call_id", "transcription": "intent"}.get(kind or "")
    if named_by is not None and named_by not in route.query:
        return Close(
            response,
            CloseCode.NO_ROUTE,
            f"provider {route.name!r} does not take {named_by} (add it to its query_params)",
            entry,
        )
    if entry.max_connections is not None and state.live_per_key.get(entry.id, 0) >= entry.max_connections:
        return Close(
            response,
            CloseCode.KEY_LIMIT,
            f"key limit of {entry.max_connections} concurrent connections reached",
            entry,
        )
    passes = route.passes(where.query if where is not None else None)
    if keyed := _key_params(forms):
        passes = passes - keyed
    forward = tuple((n, v) for n, values in query.items() if n in passes for v in values)
    hold: Callable[[bytes], tuple[str, ...]] | None = None
    template = TEMPLATES.get(route.name)
    if template is not None and template.keys != forms:
        # The route's provider reads a key in its own forms too (Deepgram's `token, KEY`
        # on the sidecar's paths): a credential of the client's there never goes upstream.
        _, theirs, _ = presented_key(template.keys, request.headers, query, offered)
        upstream_offer = [p for p in upstream_offer if p not in theirs | _announcers(template.keys)]
    greeted = template is not None and template.settings_after_welcome
    # By the route, not the path: Gemini's setup names the model on /v1/realtime/connect too.
    later: Callable[[bytes], tuple[str, ...]] | None = None
    if template is not None and template.model_in_setup:
        hold = held.setup_model
    elif greeted:
        hold, later = held.agent_settings, held.later_agent
    elif kind == "transcription":
        hold = held.transcription_model
        # Its later models matter only to a key limited to some (nothing holds a key),
        # or with a usd budget: the session's usage is priced at the model it uses.
        priced = any(b.metric == "usd" for b in entry.budgets)
        later = held.later_transcription if entry.allowed_models is not None or priced else None
    elif kind == "live":
        hold, later = held.live_models, held.later_live
    if kind in ("live_fork", "live_attach"):
        later = held.later_live
    if hold is None and model is None and entry.allowed_models is not None:
        # Nothing would name the model for allowed_models to be checked against.
        return Close(
            response, CloseCode.FORBIDDEN, "the session names no model: not allowed for this key", entry
        )
    if hold is None and where is not None and where.key_in_first:
        hold = held.keyless
    return Accept(
        response,
        entry,
        route,
        model,
        upstream_offer or None,
        forward,
        kept,
        hold,
        kind,
        anonymous,
        deployment,
        greeted,
        later,
    )


@functools.cache
def _announcers(forms: tuple[KeyForm, ...]) -> frozenset[str]:
    """The subprotocols that announce a key in the protocol after them (Deepgram's
    `token`): never offered upstream, where the provider has its key by header."""
    return frozenset(f.name for f in forms if f.where == "subprotocol" and not f.name.endswith("."))


def _without_key_subprotocols(request: Request, passed: list[str], had_key: bool) -> Request:
    """The request websockets checks: a key subprotocol is replaced by a placeholder, so
    no text websockets derives from the header (its error messages) can hold the key."""
    if not had_key:
        return request
    headers = Headers(
        [(k, v) for k, v in request.headers.raw_items() if k.lower() != "sec-websocket-protocol"]
    )
    headers["Sec-WebSocket-Protocol"] = ", ".join([*passed, "key"])
    return Request(request.path, headers)


def _refused(response: Response, exc: Exception | None) -> Refuse:
    """websockets' refusal, its body reduced to what was wrong, never a header's value."""
    if isinstance(exc, InvalidHeader):
        text = {None: "missing", "": "empty"}.get(exc.value, "invalid") + f" {exc.name} header"
        if exc.name == "Sec-WebSocket-Version":
            response.headers["Sec-WebSocket-Version"] = "13"  # the one served (RFC 6455 4.4)
    else:
        text = http.HTTPStatus(response.status_code).phrase.lower()
    body = (text + "\n").encode()
    # Headers is a multi-dict: setting adds a second Content-Length beside websockets'
    # own, and HTTP parsers (Node's among them) reject a response with two.
    del response.headers["Content-Length"]
    response.headers["Content-Length"] = str(len(body))
    return Refuse(Response(response.status_code, response.reason_phrase, response.headers, body), text)
