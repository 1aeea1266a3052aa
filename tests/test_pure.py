"""The pure parts, without sockets: the handshake decision, routing, the request
reader, key rechecks and the config loader. (Everything else is tested over
loopback against real processes.)"""

import datetime as dt

import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request

from conduit_sidecar import config as config_module
from conduit_sidecar.config import Config, ConfigError, Provider
from conduit_sidecar.handshake import Accept, Admission, Close, Refuse, decide
from conduit_sidecar.httpread import BadRequest, RequestReader
from conduit_sidecar.keys import KeyEntry, KeySet, Rejection, hash_key
from conduit_sidecar.routing import RouteError, Router

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
    assert decide(upgrade("/v1/realtime?provider=nope"), admission()).code == 4004
    refused = decide(upgrade("/elsewhere"), admission())
    assert isinstance(refused, Refuse) and refused.response.status_code == 404


def test_key_subprotocol_any_case_is_the_key_and_never_echoed():
    d = decide(upgrade(key=None, Sec_WebSocket_Protocol=f"realtime, OpenAI-Insecure-API-Key.{KEY}"),
               admission())
    assert isinstance(d, Accept) and d.subprotocols == ["realtime"]
    assert d.response.headers["Sec-WebSocket-Protocol"] == "realtime"


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


def test_request_reader_bounds_and_early_bytes():
    reader = RequestReader(1024)
    head = b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\n\r\n"
    assert reader.feed(head[:10]) is None
    request = reader.feed(head[10:] + b"\x81\x00")
    assert request.path == "/v1/realtime" and reader.early == b"\x81\x00"
    with pytest.raises(BadRequest) as exc:
        RequestReader(1024).feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 2000 + b"\r\n\r\n")
    assert exc.value.status == 431
    with pytest.raises(BadRequest) as exc:
        RequestReader(1024).feed(b"GET / HTTP/1.1\r\nAuthorization: Bearer condt_x\x01\r\n\r\n")
    assert exc.value.status == 400 and "condt_x" not in str(exc.value)


def test_config_precedence_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('listen = "127.0.0.1:1"\n[limits]\nmax_connections = 5\n')
    conf = config_module.load(str(path), overrides={"listen": "127.0.0.1:3"},
                              environ={"CONDUIT_MAX_CONNECTIONS": "7", "CONDUIT_LISTEN": "127.0.0.1:2"})
    assert conf.listen == "127.0.0.1:3" and conf.limits.max_connections == 7
    path.write_text('[limits]\nmax_connections = 0\n')
    with pytest.raises(ConfigError, match=r"\$\.limits\.max_connections"):
        config_module.load(str(path), environ={})


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
