"""Providers: built-in templates, user sections, their deployments, model routes,
and the upstream URL and headers for one session.

A provider is one or more deployments (targets): the template, overridden by the
user's section, overridden by each `[[providers.NAME.deployments]]` entry. Which
target to try, and what to do when it fails, is the upstream module's business.

Upstream URLs come only from the config. Values substituted into a URL are
percent-encoded; any value with a control character is refused.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import ssl
import sys
import urllib.parse
from collections.abc import Callable, Iterator

import msgspec
from websockets.exceptions import InvalidURI
from websockets.headers import build_authorization_basic
from websockets.uri import WebSocketURI, parse_uri

from . import redact
from ._relay import CloseCode
from .config import Config, ConfigError, Deployment, Provider
from .keys import match
from .providers import BUILTIN, TEMPLATES, Kept, takes, upstream_path
from .watch import file_signature, read_regular

__all__ = ["BUILTIN", "Route", "RouteError", "Router", "Target", "Upstream"]

log = logging.getLogger("conduit.routing")

_FIELD = re.compile(r"\{(\w+)\}")
_HASHED = re.compile(r"[0-9a-f]{8}\.[0-9]+")  # OpenSSL's name for a CA in a hashed directory
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_CA_BYTES = 1 << 20  # a ConfigMap's or Secret's limit
MAX_SECRET_BYTES = 64 << 10  # a provider key is short; a log mounted by mistake is not read whole
# A session's URL repeats: parse it once (the URI is shared and never changed; 256
# kept, as URLs hold client-chosen models).
_parse_uri = functools.lru_cache(maxsize=256)(parse_uri)
_UPSTREAMS_MAX = 256  # Router.upstream's URLs and headers kept
# Headers the sidecar owns on the upstream request; a template may not set them.
_RESERVED = {
    "host",
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "sec-websocket-accept",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
}


def _trust_system(ctx: ssl.SSLContext) -> None:
    """The system's CAs into `ctx`. OpenSSL's default loads its whole bundle into each
    context, 0.9 MiB of heap for Debian's 144 certificates, held for the life of the
    pod; its hashed directory, where it has one, is read a certificate at a time as
    verification asks for one. The two hold the same CAs where they are made together
    (update-ca-certificates). Where SSL_CERT_FILE or SSL_CERT_DIR names another bundle
    or directory, or the system has no hashed directory: OpenSSL's default."""
    paths = ssl.get_default_verify_paths()
    if (
        _system(paths.openssl_cafile_env, paths.openssl_cafile)
        and _system(paths.openssl_capath_env, paths.openssl_capath)
        and paths.capath
        and _hashed(paths.capath)
    ):
        ctx.load_verify_locations(capath=paths.capath)
    else:
        ctx.load_default_certs()


def _system(variable: str, default: str) -> bool:
    """Whether the environment leaves OpenSSL's default path as it is."""
    named = os.environ.get(variable)
    return not named or os.path.realpath(named) == os.path.realpath(default)


def _hashed(directory: str) -> bool:
    try:
        with os.scandir(directory) as entries:
            return any(_HASHED.fullmatch(entry.name) for entry in entries)
    except OSError:
        return False


class RouteError(Exception):
    """No route; `code` is the close code (4004) and the message the reason.
    `detail`: for the log only, where a configuration fault lies (a file's path, a
    variable's name: never a value)."""

    def __init__(self, code: int, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.code = code
        self.detail = detail


class _Secret:
    """A secret_file's last good secret, the file's signature when it was read, and
    the signature of the change that left it unreadable since (`()`: none)."""

    __slots__ = ("stamp", "value", "failed")

    def __init__(self, stamp: tuple | None, value: str):
        self.stamp = stamp
        self.value = value
        self.failed: tuple | None = ()


class Upstream(msgspec.Struct, frozen=True):
    uri: WebSocketURI
    headers: list[tuple[str, str]]
    ssl: ssl.SSLContext | None


class Target(msgspec.Struct, frozen=True):
    """One deployment of a provider, its template fields all resolved."""

    provider: str
    label: str  # the deployment's name, or its index
    spec: Provider
    weight: int


class Route(msgspec.Struct, frozen=True):
    name: str
    spec: Provider
    uses_model: bool
    targets: tuple[Target, ...]
    selection: str  # "weighted" | "least_sessions"
    query: frozenset[str] = frozenset()  # client query parameters that pass (see passes)
    # Every target names the model only as a query parameter's value, so a session
    # that names none (OpenAI's call_id and transcription sessions) drops that parameter.
    model_optional: bool = False

    def passes(self, own: tuple[str, ...] | None) -> frozenset[str]:
        """The client query parameters that pass on a path with its `own` allow-list
        (providers.NativePath.query) in place of the template's; the user's
        `query_params` pass on every path."""
        return self.query if own is None else frozenset(own + tuple(self.spec.query_params))

    def serves(self, kept: Kept | None) -> bool:
        """Whether every deployment serves a native path that keeps `kept` of the
        client's path upstream (providers.Kept)."""
        if kept is None:
            return True
        if kept.model is not None and not self.model_optional:
            return False  # its model parameter could not be replaced by kept.model
        return all(takes(kept, t.provider, t.spec.url or "") for t in self.targets)


# The fields a deployment may override (all of Deployment's but its label and weight).
_OVERRIDES = tuple(f for f in Deployment.__struct_fields__ if f not in ("name", "weight"))


def _merge(name: str, user: Provider | None) -> Provider:
    """A built-in template overridden field by field by the user's section."""
    base = BUILTIN.get(name)
    if base is None:
        assert user is not None  # a provider not built in is a configured one
        return user
    if user is None:
        return base
    fields = {
        f: getattr(user, f) if getattr(user, f) not in (None, []) else getattr(base, f)
        for f in Provider.__struct_fields__
    }
    return Provider(**fields)


def _targets(name: str, spec: Provider) -> tuple[Target, ...]:
    """The provider's deployments (or the provider itself as deployment "0")."""
    if not spec.deployments:
        return (Target(name, "0", spec, 1),)
    targets = []
    for i, d in enumerate(spec.deployments):
        fields = {f: getattr(d, f) for f in _OVERRIDES if getattr(d, f) is not None}
        if d.secret_file or d.secret_env:  # its own secret, wherever the provider's is
            fields.setdefault("secret_file", None)
            fields.setdefault("secret_env", None)
        targets.append(
            Target(name, d.name or str(i), msgspec.structs.replace(spec, deployments=[], **fields), d.weight)
        )
    return tuple(targets)


class Router:
    def __init__(self, config: Config, environ=os.environ):
        self.environ = environ
        self.routes: dict[str, Route] = {}
        for name in set(BUILTIN) | set(config.providers):
            spec = _merge(name, config.providers.get(name))
            targets = _targets(name, spec)
            labels = [t.label for t in targets]
            if len(set(labels)) != len(labels):
                raise ConfigError(
                    f"provider {name!r}: deployment names must be unique "
                    f"(unnamed ones are labelled by index) - at "
                    f"`$.providers.{name}.deployments`"
                )
            uses_model, model_optional = False, True
            for i, target in enumerate(targets):
                where = f"$.providers.{name}" + (f".deployments[{i}]" if spec.deployments else "")
                self._check(name, target.spec, configured=name in config.providers, where=where)
                assert target.spec.url  # _check refuses a deployment without one
                uses_model = uses_model or "{model}" in target.spec.url
                model_optional = model_optional and _without_model(target.spec) is not None
            template = TEMPLATES.get(name)
            query = frozenset((template.query if template else ()) + tuple(spec.query_params))
            self.routes[name] = Route(
                name, spec, uses_model, targets, spec.selection or "weighted", query, model_optional
            )
        # Usable now: user sections, and built-ins that were given a secret.
        self.configured = sorted(
            n
            for n, r in self.routes.items()
            if n in config.providers or "{secret}" not in _template_text(r.spec)
        )
        for pattern, names in config.routes.items():
            unknown = [n for n in names if n not in self.configured]
            if not names or unknown:
                raise ConfigError(
                    f"route {pattern!r} needs configured providers"
                    + (f", not {unknown}" if unknown else "")
                    + f' - at `$.routes."{pattern}"`'
                )
            twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
            if twice is not None:  # its deployments would be tried twice per session
                raise ConfigError(f'route {pattern!r} lists {twice!r} twice - at `$.routes."{pattern}"`')
        self.model_routes = config.routes
        self._contexts: dict[str | None, tuple[tuple | None, ssl.SSLContext]] = {}
        self._secrets: dict[str, _Secret] = {}
        # (id of the target's spec, model, query, kept, secret) -> (URI, headers, the secret in them)
        self._upstreams: dict[tuple, tuple[WebSocketURI, list[tuple[str, str]], str | None]] = {}
        # Told "ok" or "invalid" when a secret_file read before changed (the metric's hook)
        self.on_secret_reload: Callable[[str], None] = lambda result: None

    def _check(self, name: str, spec: Provider, configured: bool, where: str) -> None:
        if not spec.url:
            raise ConfigError(f"provider {name!r} needs a url - at `{where}`")
        try:
            parse_uri(_FIELD.sub("x", spec.url))
        except (InvalidURI, ValueError) as exc:  # ValueError: urllib's, on the port
            # The reason, not the URL: urllib's port message quotes what stands there.
            why = exc.msg if isinstance(exc, InvalidURI) else _QUOTED.sub("", str(exc))
            raise ConfigError(
                f"provider {name!r}: url is not a ws:// or wss:// URL: {why} - at `{where}.url`"
            ) from None
        fields = set(_FIELD.findall(spec.url))
        for value in (spec.headers or {}).values():
            fields |= set(_FIELD.findall(value))
        unknown = fields - {"model", "secret", "resource"}
        if unknown:
            raise ConfigError(
                f"provider {name!r}: unknown template field(s) {sorted(unknown)} - at `{where}`"
            )
        for header, value in (spec.headers or {}).items():
            if header.lower() in _RESERVED:
                raise ConfigError(
                    f"provider {name!r}: header {header!r} is set by the sidecar - at `{where}.headers`"
                )
            if _CONTROL.search(header + value):
                raise ConfigError(
                    f"provider {name!r}: control character in header {header!r} - at `{where}.headers`"
                )
        if configured and "secret" in fields and not (spec.secret_file or spec.secret_env):
            raise ConfigError(f"provider {name!r} needs secret_file or secret_env - at `{where}`")
        if configured and "resource" in fields and not spec.resource:
            raise ConfigError(f"provider {name!r} needs resource - at `{where}.resource`")
        own = {n for n, _ in urllib.parse.parse_qsl(urllib.parse.urlsplit(spec.url).query)}
        template = TEMPLATES.get(name)
        if (
            template is not None
            and (template.model_in_setup or template.settings_after_welcome)
            and "model" in fields
        ):
            # Its SDKs name the model in their first message, none in the URL: every
            # session would get 4004 "needs a model".
            raise ConfigError(
                f"provider {name!r} names its model in the session's first message: its url "
                f"cannot use {{model}} - at `{where}.url`"
            )
        keys = {f.name for f in template.keys if f.where == "query"} if template else set()
        for param in spec.query_params:
            if param in own or param in keys or _CONTROL.search(param) or not param:
                raise ConfigError(
                    f"provider {name!r}: query parameter {param!r} is the template's "
                    f"own or a key - at `{where}.query_params`"
                )
        if spec.ca_file and not os.path.exists(spec.ca_file):
            raise ConfigError(f"provider {name!r}: ca_file {spec.ca_file!r} not found - at `{where}.ca_file`")

    def route(self, model: str | None, provider: str | None, without_model: bool = False) -> Route:
        """The provider for a request: named by `provider=`, else by the model routes.
        `without_model`: a session that names no model, for providers that can do
        without one in their URL."""
        if provider is not None:
            route = self.routes.get(provider)
            if route is None or provider not in self.configured:
                raise RouteError(CloseCode.NO_ROUTE, f"unknown provider {provider!r}")
        else:
            if model is None:
                raise RouteError(CloseCode.NO_ROUTE, "no model and no provider given")
            chain = self._chain(model)
            route = (
                self.routes[chain[0]]
                if chain
                else next(
                    (
                        self.routes[n]
                        for n in self.configured
                        if any(match(p, model) for p in self.routes[n].spec.models)
                    ),
                    None,
                )
            )
            if route is None:
                raise RouteError(CloseCode.NO_ROUTE, f"no provider serves model {model!r}")
        if route.uses_model and not model and not (without_model and route.model_optional):
            raise RouteError(CloseCode.NO_ROUTE, f"provider {route.name!r} needs a model")
        return route

    def _chain(self, model: str) -> list[str]:
        """The providers of the first `[routes]` pattern that matches the model."""
        return next((names for pattern, names in self.model_routes.items() if match(pattern, model)), [])

    def fallbacks(self, route: Route, model: str | None, kept: Kept | None = None) -> list[Route]:
        """The providers a model route lists after `route`, to fail over to: those that
        serve the client's path (`kept`: see providers.Kept)."""
        # (No [routes]: nothing to search, a generator per session saved.)
        chain = self._chain(model) if model and self.model_routes else []
        if route.name not in chain:
            return []
        held = _first_message(route.name)
        return [
            self.routes[n]
            for n in chain[chain.index(route.name) + 1 :]
            if self.routes[n].serves(kept) and _first_message(n) in ((False, False), held)
        ]

    def secret(self, spec: Provider) -> str:
        """The provider's secret; RouteError (its `detail` says where and why) when it
        cannot be read, or no header could carry it: headers go out in ISO-8859-1 (a
        typographic quote pasted with the key cannot), and no provider's key has a
        character outside ASCII. An empty one (a Secret created without its key's value)
        would go out as `Bearer `, and the provider's 401 look like a revoked key.
        A `secret_file` read once and then gone or unusable (a Secret deleted, a key
        removed from it, a mistaken edit) leaves its last good secret in use, with one
        warning per change of the file: every session of the provider failing is worse
        than a secret the provider may still take."""
        value = self._read_secret(spec)
        redact.remember(_source(spec), value)  # a provider may quote it back in a close reason
        return value

    def _read_secret(self, spec: Provider) -> str:
        if spec.secret_env:
            value = self.environ.get(spec.secret_env)
            if value is None:
                raise RouteError(
                    CloseCode.INTERNAL_ERROR, "provider secret unavailable", f"{_source(spec)} is not set"
                )
            why = _unusable(value := value.strip())
            if why:
                raise RouteError(
                    CloseCode.INTERNAL_ERROR, "provider secret unavailable", f"{_source(spec)}: {why}"
                )
            return value
        path = spec.secret_file
        assert path is not None  # _check: a {secret} template has a source
        stamp = file_signature(path)  # a rotated Secret is read again
        cached = self._secrets.get(path)
        if cached is not None and stamp in (cached.stamp, cached.failed):
            return cached.value
        try:
            if stamp is None:
                os.stat(path)  # failed just now: again, for its reason
            data = read_regular(path, MAX_SECRET_BYTES)
            value = data.decode("utf-8-sig").strip()  # a BOM (Notepad's) dropped
            why = _unusable(value)
        except OSError as exc:  # no file, or not a regular one
            why = exc.strerror
        except UnicodeDecodeError:  # a binary key file
            why = "not UTF-8 text"
        fields = {"event": "provider_secret_reload", "source": _source(spec)}
        if why is None:
            if cached is not None:
                log.info("provider secret reloaded", extra={**fields, "result": "ok"})
                self.on_secret_reload("ok")
            self._secrets[path] = _Secret(stamp, value)
            return value
        if cached is None:  # never read: the configuration's fault
            raise RouteError(
                CloseCode.INTERNAL_ERROR, "provider secret unavailable", f"{_source(spec)}: {why}"
            )
        cached.failed = stamp  # not read again, nor warned of, until the file changes
        log.warning(
            "provider secret unreadable; keeping the last good one",
            extra={**fields, "result": "invalid", "error": why},
        )
        self.on_secret_reload("invalid")
        return cached.value

    def ssl_context(self, ca_file: str | None) -> ssl.SSLContext:
        """Verified client context: system trust store plus the provider's CA, TLS 1.2+,
        no TLS 1.2 renegotiation (a provider's HelloRequest is answered with a
        no_renegotiation alert: a handshake run inside the relay's reads and writes
        could drop the leg mid-session, by timing). A `ca_file` that was replaced (a
        rotated Secret or ConfigMap) is read again into a new context; TLS sessions are
        kept per context (tlsleg.SessionCache), so none verified under the old CAs is
        offered again."""
        stamp = file_signature(ca_file) if ca_file else None
        cached = self._contexts.get(ca_file)
        if cached is None or cached[0] != stamp:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, checks the host name
            _trust_system(ctx)
            if (keylog := os.environ.get("SSLKEYLOGFILE")) and not sys.flags.ignore_environment:
                ctx.keylog_filename = keylog  # as ssl.create_default_context, for debugging
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.options |= ssl.OP_NO_RENEGOTIATION
            if ca_file:
                try:
                    # cadata takes ASCII only: a bundle's comments may name an issuer
                    # outside it, and OpenSSL reads nothing outside the PEM blocks.
                    ctx.load_verify_locations(
                        cadata=read_regular(ca_file, MAX_CA_BYTES).decode("ascii", "ignore")
                    )
                    why = None
                except (ssl.SSLError, ValueError):  # ValueError: an empty file
                    why = "no PEM certificates"
                except OSError as exc:
                    why = exc.strerror
                if why:
                    raise RouteError(
                        CloseCode.INTERNAL_ERROR, "provider CA file unavailable", f"ca_file {ca_file}: {why}"
                    )
            cached = self._contexts[ca_file] = (stamp, ctx)
        return cached[1]

    def upstream(
        self,
        target: Target,
        model: str | None,
        query: tuple[tuple[str, str], ...] = (),
        kept: Kept | None = None,
        secret: bool = True,
    ) -> Upstream:
        """The URL and headers for one session at one deployment (secrets filled in), with
        the client's allowed query parameters appended and the part of its path `kept`
        keeps (Route.serves said the target takes it). No
        `model`: the URL's model parameter is dropped (route() allowed it); so it is
        where `kept` names the parameter the model goes in instead. `secret`
        False: headers that carry the secret are left out (a session nobody presented a
        key for never gets the provider's credential).
        Sessions repeat a few of these: each URL and headers are built once (256 kept:
        models are the clients'), and reused while the secret they hold is the one
        read now (the secret and the CA file are still read for every session)."""
        spec = target.spec
        shape = (id(spec), model, query, kept, secret)  # (specs are this router's, as long-lived)
        made = self._upstreams.get(shape)
        if made is not None:
            uri, headers, used = made
            if used is None or self.secret(spec) == used:
                return Upstream(uri, headers, self.ssl_context(spec.ca_file) if uri.secure else None)
        upstream, used = self._upstream(target, model, query, kept, secret)
        if len(self._upstreams) >= _UPSTREAMS_MAX:
            del self._upstreams[next(iter(self._upstreams))]  # the oldest
        self._upstreams[shape] = (upstream.uri, upstream.headers, used)
        return upstream

    def _upstream(
        self,
        target: Target,
        model: str | None,
        query: tuple[tuple[str, str], ...],
        kept: Kept | None,
        secret: bool,
    ) -> tuple[Upstream, str | None]:
        """upstream() built anew, and the secret it holds (None: none)."""
        spec = target.spec
        url = spec.url
        assert url is not None  # _check refused a target without one
        moved = kept is not None and kept.model is not None
        if (model is None or moved) and "{model}" in url:
            url = _without_model(spec)
            assert url is not None  # route() and Route.serves admit only URLs it can drop from
        header_templates = {h: v for h, v in (spec.headers or {}).items() if secret or "{secret}" not in v}
        if not secret and "{secret}" in url:
            raise RouteError(CloseCode.NO_ROUTE, f"provider {target.provider!r} needs its secret in the URL")
        if model and spec.model_names:
            model = spec.model_names.get(model) or next(
                (name for pattern, name in spec.model_names.items() if match(pattern, model)), model
            )
        values = {"model": model or "", "resource": spec.resource or ""}
        if "{secret}" in url + "".join(header_templates.values()):
            values["secret"] = self.secret(spec)
        for field, value in values.items():
            if _CONTROL.search(value):
                raise RouteError(
                    CloseCode.NO_ROUTE if field == "model" else CloseCode.INTERNAL_ERROR,
                    f"control character in {field}",
                    f"{_source(spec)}: a control character" if field == "secret" else None,
                )
            if value in (".", ".."):
                # Percent-encoding leaves dots alone: `{model}` = ".." would climb the path.
                raise RouteError(
                    CloseCode.NO_ROUTE if field == "model" else CloseCode.INTERNAL_ERROR,
                    f"{field} is a dot segment",
                )
        url = _FIELD.sub(lambda m: urllib.parse.quote(values[m.group(1)], safe=""), upstream_path(url, kept))
        headers = [(h, _FIELD.sub(lambda m: values[m.group(1)], v)) for h, v in header_templates.items()]
        # A provider may quote back any credential of the config's (not a client's
        # query parameter): one source each, as many as the config's specs. Parsed
        # uncached: this URL is never dialled, and built only when the upstream is.
        for where, credential in _credentials(parse_uri(url), headers):
            redact.remember(f"{where} of provider spec {id(spec)}", credential)
        if moved and model:
            assert kept is not None and kept.model is not None  # moved says so
            query = ((kept.model, model), *query)
        if query:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
        uri = _parse_uri(url)
        context = self.ssl_context(spec.ca_file) if uri.secure else None
        return Upstream(uri, headers, context), values.get("secret")


_QUOTED = re.compile(r" as '.*'$", re.S)


def _first_message(name: str) -> tuple[bool, bool]:
    """How a built-in provider's sessions name their models in the first message
    (Gemini's setup; Deepgram's agent Settings, after its Welcome). The session's route
    decides whether it is held and checked (handshake.decide): a fallback that needs
    such a hold where its session's route had none would take models `allowed_models`
    never saw, so fallbacks() skips it."""
    template = TEMPLATES.get(name)
    return (False, False) if template is None else (template.model_in_setup, template.settings_after_welcome)


def _without_model(spec: Provider) -> str | None:
    """The URL template without its `...={model}` query parameter; None when the
    template names the model elsewhere too (its path or headers)."""
    assert spec.url is not None  # built-ins have one, _check the rest
    base, _, query = spec.url.partition("?")
    kept = [p for p in query.split("&") if p and p.partition("=")[2] != "{model}"]
    url = base + ("?" + "&".join(kept) if kept else "")
    return None if "{model}" in url + "".join((spec.headers or {}).values()) else url


def _template_text(spec: Provider) -> str:
    assert spec.url is not None  # built-ins have one, _check the rest
    return spec.url + "".join((spec.headers or {}).values())


# Header and query parameter names that say their value is a credential.
_CREDENTIAL = re.compile(r"auth|key|token|secret|signature|password|cookie", re.IGNORECASE)
_PARAM = re.compile(r"([?&][^=&#]*=)([^&#]*)")
_USERINFO = re.compile(r"^(\w+://)[^/?#]*@")  # user:password@, sent as Basic auth


def masked(spec: Provider) -> tuple[str, dict[str, str]]:
    """URL and header templates as listings print them: the secret placeholder shown as
    `***`, and so is a credential typed into the config itself (a header or query
    parameter named as one, without the placeholder, or the URL's user information)."""

    def hide(name: str, value: str) -> str:
        if _CREDENTIAL.search(name) and value and "{secret}" not in value:
            return "***"
        return value.replace("{secret}", "***")

    url = _PARAM.sub(lambda m: m[1] + hide(m[1], m[2]), _USERINFO.sub(r"\1***@", spec.url or ""))
    return url, {h: hide(h, v) for h, v in (spec.headers or {}).items()}


def _credentials(uri: WebSocketURI, headers: list[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """(where, value) of each credential an upgrade request to `uri` with `headers`
    carries, the `{secret}` or one typed into the config: the value of each header
    (its scheme left out) and query parameter named as one, the URL's password, and
    the Basic authorization websockets sends of the URL's user information."""
    for name, value in headers:
        if _CREDENTIAL.search(name) and value.strip():
            yield f"header {name}", value.split()[-1]
    for name, value in urllib.parse.parse_qsl(uri.query):
        if _CREDENTIAL.search(name):
            yield f"query {name}", value
    if uri.user_info is not None:
        yield "password", uri.user_info[1]
        yield "basic", build_authorization_basic(*uri.user_info).split()[-1]


def _unusable(secret: str) -> str | None:
    """Why no header could carry `secret` (see Router.secret), None when one can."""
    return "empty" if not secret else None if secret.isascii() else "a character outside ASCII"


def _source(spec: Provider) -> str:
    """Where a provider's secret is read, for a log line: the variable's name or the
    file's path (never the value)."""
    return f"secret_env {spec.secret_env}" if spec.secret_env else f"secret_file {spec.secret_file}"
