"""The client handshake as a pure function: request + loaded state -> decision.

No I/O here. The HTTP request is parsed by websockets' sans-I/O parser and checked
by its ServerProtocol (Upgrade, Connection, Sec-WebSocket-Key/Version, Origin).
Auth and routing failures complete the upgrade and then close with a 4xxx code,
because browser clients cannot read an HTTP status and the documented clients
decide on reconnecting from the close code.
"""

from __future__ import annotations

import datetime as dt
import http
import re
import urllib.parse

import msgspec
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHeader
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from .keys import KeyEntry, KeySet, Rejection
from .routing import Route, RouteError, Router

__all__ = ["Accept", "Admission", "Close", "PATHS", "Refuse", "SUBPROTOCOL_KEY_PREFIX", "decide",
           "refuse"]

PATHS = ("/v1/realtime/connect", "/v1/realtime")
# What OpenAI's browser clients put the API key in (a browser cannot set headers).
SUBPROTOCOL_KEY_PREFIX = "openai-insecure-api-key."
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Admission(msgspec.Struct, frozen=True):
    """What the process knows when a request arrives: everything `decide` reads."""
    keyset: KeySet
    router: Router
    now: dt.datetime
    live_per_key: dict[str, int]
    at_capacity: bool
    draining: bool
    allowed_origins: list[str] | None


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
    rejection: Rejection | None = None     # for 4001: why the key was refused


class Accept(msgspec.Struct, frozen=True):
    """Open the upstream; on success answer with `response` (plus its subprotocol)."""
    response: Response
    key: KeyEntry
    route: Route
    model: str | None
    subprotocols: list[str] | None


def _rejected(response: Response, why: Rejection, key: KeyEntry | None = None) -> Close:
    return Close(response, 4001, why.value, key, why)


def refuse(status: int, text: str) -> Refuse:
    body = (text + "\n").encode()
    headers = Headers([("Connection", "close"), ("Content-Length", str(len(body))),
                       ("Content-Type", "text/plain; charset=utf-8")])
    return Refuse(Response(status, http.HTTPStatus(status).phrase, headers, body), text)


def _offered(request: Request) -> list[str]:
    return [p.strip() for v in request.headers.get_all("Sec-WebSocket-Protocol")
            for p in v.split(",") if p.strip()]


def decide(request: Request, state: Admission) -> Refuse | Close | Accept:
    url = urllib.parse.urlsplit(request.path)
    if url.path not in PATHS:
        return refuse(404, f"not found: use {PATHS[0]}")
    offered = _offered(request)
    presented = [p for p in offered if _is_key_subprotocol(p)]
    passed = [p for p in offered if not _is_key_subprotocol(p)]

    # Answer the client with one of its own subprotocols, never the key one.
    # allowed_origins guards against other sites' pages; clients that send no Origin
    # (SDKs, servers) are not browsers and pass.
    origins = None if state.allowed_origins is None else [*state.allowed_origins, None]
    ws = ServerProtocol(origins=origins, select_subprotocol=lambda _, __: None)
    response = ws.accept(_without_key_subprotocols(request, passed, bool(presented)))
    if response.status_code != 101:
        return _refused(response, ws.handshake_exc)
    if passed:
        response.headers["Sec-WebSocket-Protocol"] = passed[0]

    try:
        query = urllib.parse.parse_qs(url.query, strict_parsing=False, errors="strict")
    except UnicodeDecodeError:
        return refuse(400, "query is not valid UTF-8")
    for name in ("model", "provider"):
        values = query.get(name, [])
        if len(values) > 1:
            return refuse(400, f"{name} given more than once")
        if values and _CONTROL.search(values[0]):
            return refuse(400, f"{name} contains control characters")
    model = query.get("model", [None])[0]
    provider = query.get("provider", [None])[0]

    if state.draining:
        return Close(response, 1013, "sidecar is draining: try again later")
    if state.at_capacity:
        return Close(response, 1013, "sidecar at its connection limit: try again later")

    key = _presented_key(request, presented)
    if key is None:
        return _rejected(response, Rejection.MISSING)
    entry = state.keyset.lookup(key)
    if entry is None:
        return _rejected(response, Rejection.UNKNOWN)
    if not entry.enabled:
        return _rejected(response, Rejection.DISABLED, entry)
    if entry.expired(state.now):
        return _rejected(response, Rejection.EXPIRED, entry)

    try:
        route = state.router.route(model, provider)
    except RouteError as exc:
        return Close(response, exc.code, str(exc), entry)
    if not entry.allows_provider(route.name):
        return Close(response, 4003, f"provider {route.name!r} not allowed for this key", entry)
    if model is not None and not entry.allows_model(model):
        return Close(response, 4003, f"model {model!r} not allowed for this key", entry)
    if entry.max_connections is not None and state.live_per_key.get(entry.id, 0) >= entry.max_connections:
        return Close(response, 4029,
                     f"key limit of {entry.max_connections} concurrent connections reached", entry)
    return Accept(response, entry, route, model, passed or None)


def _is_key_subprotocol(protocol: str) -> bool:
    return protocol[:len(SUBPROTOCOL_KEY_PREFIX)].lower() == SUBPROTOCOL_KEY_PREFIX


def _without_key_subprotocols(request: Request, passed: list[str], had_key: bool) -> Request:
    """The request websockets checks: a key subprotocol is replaced by a placeholder, so
    no text websockets derives from the header (its error messages) can hold the key."""
    if not had_key:
        return request
    headers = Headers([(k, v) for k, v in request.headers.raw_items()
                       if k.lower() != "sec-websocket-protocol"])
    headers["Sec-WebSocket-Protocol"] = ", ".join([*passed, SUBPROTOCOL_KEY_PREFIX + "key"])
    return Request(request.path, headers)


def _refused(response: Response, exc: Exception | None) -> Refuse:
    """websockets' refusal, its body reduced to what was wrong, never a header's value."""
    if isinstance(exc, InvalidHeader):
        text = {None: "missing", "": "empty"}.get(exc.value, "invalid") + f" {exc.name} header"
    else:
        text = http.HTTPStatus(response.status_code).phrase.lower()
    body = (text + "\n").encode()
    response.headers["Content-Length"] = str(len(body))
    return Refuse(Response(response.status_code, response.reason_phrase, response.headers, body), text)


def _presented_key(request: Request, presented: list[str]) -> str | None:
    auth = request.headers.get_all("Authorization")
    if len(auth) == 1:
        scheme, _, token = auth[0].partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if len(presented) == 1:
        return presented[0][len(SUBPROTOCOL_KEY_PREFIX):]
    return None

