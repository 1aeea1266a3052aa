"""The config file (TOML), decoded with msgspec, and its overrides.

Precedence: defaults < file (`--config` or `CONDUIT_CONFIG`) < `CONDUIT_*`
environment variables < command-line flags. Errors name the file (or the variable
or flag that set the value), the field path and the problem.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Callable
from typing import Annotated, Literal

import msgspec

__all__ = [
    "ADMIN_PORT",
    "Audio",
    "CONFIG_ENV",
    "Circuit",
    "Config",
    "ConfigError",
    "Deployment",
    "LISTEN_PORT",
    "Limits",
    "Price",
    "Provider",
    "State",
    "TLS",
    "TLS_PORT",
    "env_var",
    "load",
    "misspelt",
    "split_hostport",
]

# Default ports (the pod injector, k8s/inject.py, uses them too).
LISTEN_PORT = 8080
ADMIN_PORT = 9464
TLS_PORT = 8443
CONFIG_ENV = "CONDUIT_CONFIG"  # the config file's path

# Bounded above: TOML has `inf` (an infinite timeout is none at all, a lease of inf ms
# no integer) and integers of any size (the relay's byte limits are 64-bit).
_MAX_SECONDS = 1e9  # also caps prices: any real value is far below
_MAX_INT = (1 << 63) - 1  # TOML's own integer range
Positive = Annotated[float, msgspec.Meta(gt=0, le=_MAX_SECONDS)]
NonNegative = Annotated[float, msgspec.Meta(ge=0, le=_MAX_SECONDS)]
Count = Annotated[int, msgspec.Meta(ge=1, le=_MAX_INT)]
# As browsers send an Origin: scheme://host[:port], no path (a trailing / never matched),
# in lower case, without the scheme's default port (the match is exact: neither would).
# \Z, not $: $ also matches before a final newline.
WebOrigin = Annotated[
    str,
    msgspec.Meta(pattern=r"^(null|(?!http://.*:80\Z|https://.*:443\Z)[a-z][a-z0-9+.-]*://[^/?#\sA-Z]+)\Z"),
]


class ConfigError(Exception):
    """A config or key file problem; the message names file, field and problem."""


MIN_SOCKET_BUFFER = 65536


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_connections: Count = 1000
    handshake_timeout_seconds: Positive = 10.0
    upstream_connect_timeout_seconds: Positive = 10.0
    dns_cache_seconds: NonNegative = 30.0  # then a provider host's addresses are refreshed (0: no cache)
    close_timeout_seconds: Positive = 5.0
    idle_timeout_seconds: NonNegative = 0.0  # 0: sessions may idle forever
    max_message_bytes: Count = 16 * 1024 * 1024
    # A held first message (Gemini's setup, a transcription session's update) is kept
    # whole before the model is known: its own, smaller bound.
    first_message_bytes: Count = 1024 * 1024
    max_request_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1 << 20)] = 16384
    drain_seconds: NonNegative = 25.0
    # Each client and provider socket's kernel send and receive buffers (SO_SNDBUF,
    # SO_RCVBUF; the kernel doubles it): what a stalled peer makes the kernel hold, which
    # a cgroup v2 memory limit counts. 0: the kernel's own sizing (megabytes a socket).
    socket_buffer_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 30)] = 0

    def __post_init__(self):
        if 0 < self.socket_buffer_bytes < MIN_SOCKET_BUFFER:
            # Less than two of loopback's 64 KiB segments: a receiver that can never
            # take a full one stalls its sender (960-byte frames: 2,800 a second).
            raise ValueError(
                f"socket_buffer_bytes is 0 (the kernel's sizing) or at least {MIN_SOCKET_BUFFER}"
            )


class Deployment(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One place a provider runs; every field set here overrides the provider's."""

    name: str | None = None  # label in logs and metrics; default: its index
    weight: Count = 1  # for selection = "weighted"
    url: str | None = None
    headers: dict[str, str] | None = None
    secret_file: str | None = None
    secret_env: str | None = None
    ca_file: str | None = None
    resource: str | None = None
    model_names: dict[str, str] | None = None


class Provider(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A provider section; for built-in providers every field overrides the template."""

    url: str | None = None
    headers: dict[str, str] | None = None
    secret_file: str | None = None
    secret_env: str | None = None
    models: list[str] = []
    ca_file: str | None = None
    resource: str | None = None  # azure: the resource name in the host
    # The client's model pattern -> the name the provider knows it by (Azure: a deployment).
    model_names: dict[str, str] | None = None
    deployments: list[Deployment] = []
    selection: Literal["weighted", "least_sessions"] | None = None
    query_params: list[str] = []  # client query parameters to pass, beyond the template's


class Circuit(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Per deployment: `failures` failed attempts in a row rest it for `cooldown_seconds`,
    doubled per failed probe up to `max_cooldown_seconds`."""

    failures: Count = 5
    cooldown_seconds: Positive = 5.0
    max_cooldown_seconds: Positive = 60.0


class Audio(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The format of binary audio frames, to turn relayed bytes into seconds."""

    sample_rate: Count = 24000
    sample_format: Literal["pcm16", "g711_ulaw", "g711_alaw"] = "pcm16"
    channels: Count = 1

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * self.channels * (2 if self.sample_format == "pcm16" else 1)


class TLS(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    listen: str = f"127.0.0.1:{TLS_PORT}"
    cert_file: str | None = None
    key_file: str | None = None
    self_signed: bool = False
    ca_out: str | None = None
    state_dir: str | None = None


class Price(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """USD per million tokens of each kind (the token metric's kinds), and per minute
    of audio for providers that bill by duration."""

    input_text: NonNegative = 0.0
    input_audio: NonNegative = 0.0
    input_image: NonNegative | None = None  # images and video frames; None: at input_text
    input_cached: NonNegative = 0.0
    output_text: NonNegative = 0.0
    output_audio: NonNegative = 0.0
    audio_minute: NonNegative = 0.0


class State(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Where counts that span pods live: leases, session rates, budget windows."""

    backend: Literal["local", "redis"] = "local"
    url: str | None = None  # redis:// or rediss://
    password_file: str | None = None
    key_prefix: str = "conduit:"
    on_unavailable: Literal["open", "closed"] = "open"
    # A dead pod's leases expire after this; live ones are renewed every third of it.
    lease_seconds: Annotated[float, msgspec.Meta(ge=3, le=_MAX_SECONDS)] = 15.0
    timeout_seconds: Positive = 0.5  # per Redis call
    # Connections to Redis per sidecar at most: 16 from each of 600 pods stay under
    # Redis' default maxclients (10,000), and 16 calls in flight (one round trip each)
    # make 16,000 a second at a 1 ms round trip.
    pool_size: Count = 16


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    listen: str = f"127.0.0.1:{LISTEN_PORT}"
    admin_listen: str = f"127.0.0.1:{ADMIN_PORT}"
    keys_file: str = "/etc/conduit/keys/keys.json"
    # The key file, certificates, expiry and idle sessions: each poll rechecks every live
    # session, so not more often than this.
    keys_poll_seconds: Annotated[float, msgspec.Meta(ge=0.1, le=_MAX_SECONDS)] = 2.0
    log_level: str = "info"
    allowed_origins: list[WebOrigin] | None = None
    limits: Limits = Limits()
    audio: Audio = Audio()
    providers: dict[str, Provider] = {}
    routes: dict[str, list[str]] = {}  # model pattern -> providers, tried in order
    circuit: Circuit = Circuit()
    tls: TLS | None = None
    kernel_tls: bool = True  # the kernel encrypts TLS legs' sends where it can (Linux tls module)
    prices: dict[str, Price] = {}  # model pattern (exact, or prefix*) -> price
    state: State = State()


_FLAGS = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(("0", "false", "no", "off"), False)


def _flag(value: str) -> bool:
    # Anything else is refused: read as off, `CONDUIT_KERNEL_TLS=enabled` turned it off.
    if value.lower() not in _FLAGS:
        raise ValueError(value)
    return _FLAGS[value.lower()]


# Environment overrides: variable -> (section or None, field, type).
_ENV: dict[str, tuple[str | None, str, Callable[[str], object]]] = {
    "CONDUIT_LISTEN": (None, "listen", str),
    "CONDUIT_ADMIN_LISTEN": (None, "admin_listen", str),
    "CONDUIT_KEYS_FILE": (None, "keys_file", str),
    "CONDUIT_LOG_LEVEL": (None, "log_level", str),
    "CONDUIT_MAX_CONNECTIONS": ("limits", "max_connections", int),
    "CONDUIT_DRAIN_SECONDS": ("limits", "drain_seconds", float),
    "CONDUIT_TLS_LISTEN": ("tls", "listen", str),
    "CONDUIT_TLS_CERT_FILE": ("tls", "cert_file", str),
    "CONDUIT_TLS_KEY_FILE": ("tls", "key_file", str),
    "CONDUIT_TLS_SELF_SIGNED": ("tls", "self_signed", _flag),
    "CONDUIT_TLS_CA_OUT": ("tls", "ca_out", str),
    "CONDUIT_TLS_STATE_DIR": ("tls", "state_dir", str),
    "CONDUIT_KERNEL_TLS": (None, "kernel_tls", _flag),
}


# Kubernetes' service variables: a Service `conduit-tls` in the namespace gives every
# container CONDUIT_TLS_SERVICE_HOST, CONDUIT_TLS_PORT_443_TCP_ADDR and the like.
_SERVICE_VARIABLE = re.compile(
    r"_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)$"
)


def misspelt(environ: os._Environ | dict, also: set[str]) -> list[str]:
    """`CONDUIT_*` variables that set nothing but are near the name of one that does:
    a typo there (`CONDUIT_MAX_CONECTIONS`) is ignored, so say so. Only near ones, and
    no service variables: other programs' and Kubernetes' share the prefix. `also`:
    the variables the config reads secrets from."""
    known = {*_ENV, CONFIG_ENV, *also}
    odd = [v for v in environ if v.startswith("CONDUIT_") and v not in known]
    odd = [v for v in odd if not _SERVICE_VARIABLE.search(v)]
    if not odd:
        return []
    import difflib  # (only then: a start-up with none imports nothing for it)

    # Compared without the prefix, which every name shares and which would make any two look alike.
    names = {name.removeprefix("CONDUIT_"): name for name in known}
    return [
        f"${var} sets nothing; did you mean ${names[near[0]]}?"
        for var in sorted(odd)
        if (near := difflib.get_close_matches(var.removeprefix("CONDUIT_"), list(names), 1, 0.8))
    ]


def env_var(section: str | None, field: str) -> str:
    """The environment variable that overrides `field` of `[section]` (None: top level)."""
    return next(var for var, (s, f, _) in _ENV.items() if (s, f) == (section, field))


def split_hostport(value: str) -> tuple[str, int]:
    """'127.0.0.1:8080' or '[::1]:8080' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if int(port) > 65535:  # uvloop would bind the port modulo 65536
        raise ValueError(f"port out of range (0-65535) in {value!r}")
    return host.strip("[]"), int(port)


def _within(path: str | None, directory: str | None) -> bool:
    """Whether `path` lies inside `directory` (symbolic links followed)."""
    if not path or not directory:
        return False
    inner, outer = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath((inner, outer)) == outer


def source(path: str | None = None, environ: os._Environ | dict | None = None) -> str:
    """The file a config comes from (`--config`, else $CONDUIT_CONFIG), or "defaults":
    what every message about it names first."""
    return path or (os.environ if environ is None else environ).get(CONFIG_ENV) or "defaults"


def _located(raw: dict, exc: msgspec.ValidationError) -> str:
    """msgspec's message, naming the entry of a table of tables where msgspec elides it
    (`$.providers[...]`): with several providers, the user needs to know which."""
    text = str(exc)
    for section, kind in (("providers", Provider), ("prices", Price), ("routes", list[str])):
        table = raw.get(section)
        if f"`$.{section}[...]" not in text or not isinstance(table, dict):
            continue
        for name, value in table.items():
            try:
                msgspec.convert(value, kind)
            except msgspec.ValidationError as one:
                problem, _, at = str(one).partition(" - at `$")
                entry = f".{name}" if name.isidentifier() else f'."{name}"'
                return f"{problem} - at `$.{section}{entry}{at or '`'}"
    return text


def load(
    path: str | None = None, overrides: dict | None = None, environ: os._Environ | dict | None = None
) -> Config:
    """Read the config file (if any), then apply environment and flag overrides."""
    environ = os.environ if environ is None else environ
    raw: dict = {}
    where = source(path, environ)
    if where != "defaults":
        try:
            with open(where, "rb") as f:  # a byte-order mark (Notepad's) dropped: TOML has none
                raw = msgspec.toml.decode(f.read().removeprefix(b"\xef\xbb\xbf"))
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    held = set(raw)  # the file's own top-level fields and tables
    set_by: dict[str, str] = {}  # a field's path -> the variable or flag that set it
    for var, (section, field, conv) in _ENV.items():
        if var in environ:
            target = raw if section is None else raw.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{where}: [{section}] must be a table - at `$.{section}`")
            try:
                target[field] = conv(environ[var])
            except ValueError:
                raise ConfigError(f"${var}: not a valid {field}: {environ[var]!r}") from None
            set_by[f"$.{section}.{field}" if section else f"$.{field}"] = f"${var}"
    for field, value in (overrides or {}).items():
        if value is not None:
            raw[field] = value
            set_by[f"$.{field}"] = "--" + field.replace("_", "-")

    def error(message: str) -> ConfigError:
        """Named by what set the value: a variable or flag, else the file; a table the
        file does not hold ([tls] from $CONDUIT_TLS_*) by the variables that made it."""
        at = message.rpartition(" - at `")[2].rstrip("`")
        by = set_by.get(at)
        if by is None and at[2:] not in held:
            by = ", ".join(v for path, v in set_by.items() if path.startswith(at + ".")) or None
        return ConfigError(f"{by or where}: {message}")

    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise error(_located(raw, exc)) from None
    for field in ("listen", "admin_listen"):
        try:
            split_hostport(getattr(config, field))
        except ValueError as exc:
            raise error(f"{exc} - at `$.{field}`") from None
    if config.tls is not None:
        try:
            split_hostport(config.tls.listen)
        except ValueError as exc:
            raise error(f"{exc} - at `$.tls.listen`") from None
        if config.tls.self_signed == bool(config.tls.cert_file and config.tls.key_file):
            raise error("[tls] needs either cert_file and key_file, or self_signed = true - at `$.tls`")
        if config.tls.self_signed and not (config.tls.ca_out and config.tls.state_dir):
            raise error("[tls] self_signed needs ca_out and state_dir - at `$.tls`")
        if config.tls.self_signed and _within(config.tls.ca_out, config.tls.state_dir):
            # The app mounts what holds ca_out: it would hold the CA's private key too.
            raise error("[tls] ca_out is inside state_dir, which holds the CA's private key - at `$.tls`")
    if config.state.backend == "redis":
        url = config.state.url or ""
        valid = url.startswith(("redis://", "rediss://"))
        try:
            _ = urllib.parse.urlsplit(url).port
        except ValueError:  # a port that is not a number, or out of range
            valid = False
        if not valid:  # (the message never quotes the URL: it can hold a password)
            raise error(
                '[state] backend = "redis" needs url = "redis://HOST[:PORT]..." or '
                '"rediss://..." - at `$.state.url`'
            )
    if config.circuit.cooldown_seconds > config.circuit.max_cooldown_seconds:
        # The first rest would pass the cap every later one (and Retry-After) keeps to.
        raise error("cooldown_seconds is over max_cooldown_seconds - at `$.circuit`")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise error("log_level must be debug, info, warning or error - at `$.log_level`")
    return config
