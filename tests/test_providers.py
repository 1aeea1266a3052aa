"""Built-in provider templates, the override rules, and what reaches the provider.

Every built-in template is `wss://`, so the upstream here is a TLS WebSocket server on
127.0.0.1 with a throwaway CA (made with `cryptography`). Each provider section keeps
its template and overrides only the host: `url` is the template's URL with
`wss://127.0.0.1:PORT` in front of the same path and query, and `ca_file` trusts the
throwaway CA. The upstream records the exact request path and headers it received.

The expectations are written from each provider's documentation, not copied from
`routing.BUILTIN`, so a template that drifts from the docs fails here.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import os
import re
import ssl
import subprocess
import sys
import tempfile
import textwrap
import urllib.parse

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from conduit_sidecar import config as config_mod
from conduit_sidecar.routing import BUILTIN, Router

from conftest import Keys, SidecarProcess, held_port, run

# A provider secret with characters that must be percent-encoded in a URL.
SECRET = "s3cr/t+key=&x"
SECRET_IN_URL = "s3cr%2Ft%2Bkey%3D%26x"

# What each provider's documentation requires (URL template and auth headers).
#   openai:     platform.openai.com/docs/guides/realtime-websocket (GA: no OpenAI-Beta)
#   azure:      learn.microsoft.com .../realtime-audio-websockets (GA /openai/v1 path, api-key)
#   gemini:     ai.google.dev/api/live (BidiGenerateContent, API key in `key=`)
#   elevenlabs: elevenlabs.io/docs/conversational-ai (agent_id query, xi-api-key header)
#   deepgram:   developers.deepgram.com/reference/speech-to-text-api/listen-streaming
#               (Authorization: Token <key>)
#   deepgram_agent: developers.deepgram.com/reference/voice-agent/voice-agent (another
#               host, agent.deepgram.com; Authorization: Token <key>; models in Settings)
#   assemblyai: assemblyai.com/docs/api-reference/streaming-api (v3; Authorization: <key>;
#               `speech_model` is a required connection parameter, "there is no default")
DOCUMENTED = {
    "openai": ("wss://api.openai.com/v1/realtime?model={model}",
               {"Authorization": "Bearer {secret}"}),
    "azure": ("wss://{resource}.openai.azure.com/openai/v1/realtime?model={model}",
              {"api-key": "{secret}"}),
    "gemini": ("wss://generativelanguage.googleapis.com/ws/google.ai.generativelanguage.v1beta."
               "GenerativeService.BidiGenerateContent?key={secret}", {}),
    "elevenlabs": ("wss://api.elevenlabs.io/v1/convai/conversation?agent_id={model}",
                   {"xi-api-key": "{secret}"}),
    "deepgram": ("wss://api.deepgram.com/v1/listen?model={model}",
                 {"Authorization": "Token {secret}"}),
    "deepgram_agent": ("wss://agent.deepgram.com/v1/agent/converse", {"Authorization": "Token {secret}"}),
    "assemblyai": ("wss://streaming.assemblyai.com/v3/ws?speech_model={model}",
                   {"Authorization": "{secret}"}),
}

# One request per provider: the client's model, and the exact path + provider headers
# that must arrive upstream.
CASES = {
    "openai": ("gpt-realtime", "/v1/realtime?model=gpt-realtime",
               {"authorization": f"Bearer {SECRET}"}),
    "azure": ("my-gpt-realtime", "/openai/v1/realtime?model=my-gpt-realtime",
              {"api-key": SECRET}),
    "gemini": (None, "/ws/google.ai.generativelanguage.v1beta.GenerativeService."
                     f"BidiGenerateContent?key={SECRET_IN_URL}", {}),
    "elevenlabs": ("agent_7 x/y&z", "/v1/convai/conversation?agent_id=agent_7%20x%2Fy%26z",
                   {"xi-api-key": SECRET}),
    "deepgram": ("nova-3", "/v1/listen?model=nova-3", {"authorization": f"Token {SECRET}"}),
    "deepgram_agent": (None, "/v1/agent/converse", {"authorization": f"Token {SECRET}"}),
    "assemblyai": ("u3-rt-pro", "/v3/ws?speech_model=u3-rt-pro", {"authorization": SECRET}),
}

# Headers the sidecar itself puts on every upstream handshake.
HANDSHAKE = {"host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version"}


# -- a throwaway CA and a TLS upstream on 127.0.0.1 ------------------------------------

def make_pki(directory: str) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 / localhost, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, encipher_only=False, decipher_only=False)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "conduit test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       **usage), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         **usage), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {name: os.path.join(directory, f"{name}.pem") for name in ("ca", "cert", "key")}
    with open(paths["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


class TLSUpstream:
    """A wss:// provider on 127.0.0.1 that records every handshake it receives
    (request path and headers), selects the first offered subprotocol, sends a
    `session.created` and echoes what it gets."""

    def __init__(self, port: int, pki: dict[str, str]):
        self.port = port
        self.ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ssl.load_cert_chain(pki["cert"], pki["key"])
        self.seen: list[tuple[str, object]] = []

    async def __aenter__(self):
        self.server = await serve(
            self._handle, "127.0.0.1", self.port, ssl=self.ssl, compression=None,
            process_request=lambda _, request: self.seen.append((request.path, request.headers)),
            select_subprotocol=lambda _, offered: offered[0] if offered else None)
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, ws):
        await ws.send('{"type":"session.created"}')
        async for message in ws:
            await ws.send(message)


def local_url(template: str, port: int, host: str = "127.0.0.1") -> str:
    """The template's URL with its scheme and host replaced: same path and query."""
    return re.sub(r"^wss://[^/]+", f"wss://{host}:{port}", template)


def client_url(port: int, provider: str, model: str | None) -> str:
    query = {"provider": provider, **({"model": model} if model is not None else {})}
    return f"ws://127.0.0.1:{port}/v1/realtime/connect?{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}"


def dump(path: str, headers) -> str:
    """Everything the upstream received, as text."""
    return path + "\n" + "".join(f"{k}: {v}\n" for k, v in headers.raw_items())


async def raw_upgrade(port: int, path: str, headers: list[tuple[str, str]]):
    """Send an upgrade request by hand; returns (status code, response head, reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
             f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
             "Sec-WebSocket-Version: 13"] + [f"{k}: {v}" for k, v in headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return int(head.split(b" ", 2)[1]), head, reader, writer


def header_lines(head: bytes) -> dict[str, str]:
    return {k.strip().lower(): v.strip() for k, _, v in
            (line.decode().partition(":") for line in head.split(b"\r\n")[1:] if line)}


async def first_close(ws) -> tuple[int, str]:
    try:
        while True:
            await ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code, exc.rcvd.reason


# -- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki():
    return make_pki(tempfile.mkdtemp(prefix="conduit-pki-"))


@pytest.fixture(scope="module")
def upstream_port():
    return held_port()


def provider_keys() -> Keys:
    keys = Keys()
    keys.add("good")
    return keys


@pytest.fixture(scope="module")
def tls_sidecar(pki, upstream_port):
    """Every built-in, with only the host overridden to the TLS upstream on loopback."""
    sections = "".join(f"""
        [providers.{name}]
        url = "{local_url(BUILTIN[name].url, upstream_port)}"
        ca_file = "{pki['ca']}"
        secret_env = "UPSTREAM_SECRET"
        """ for name in BUILTIN)
    proc = SidecarProcess(tempfile.mkdtemp(prefix="conduit-providers-"), sections, provider_keys(),
                          env={"UPSTREAM_SECRET": SECRET}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def override_sidecar(pki, upstream_port):
    """Field-by-field overrides, live: azure reaches its host through `{resource}`,
    deepgram gets new headers, elevenlabs has a secret with CR/LF, openai has no
    section (so it is not usable)."""
    providers = f"""
        [providers.azure]
        url = "wss://{{resource}}:{upstream_port}/openai/v1/realtime?model={{model}}"
        resource = "127.0.0.1"
        ca_file = "{pki['ca']}"
        secret_env = "UPSTREAM_SECRET"

        [providers.deepgram]
        url = "{local_url(BUILTIN['deepgram'].url, upstream_port)}"
        headers = {{ Authorization = "Bearer {{secret}}", X-Team = "voice" }}
        ca_file = "{pki['ca']}"
        secret_env = "UPSTREAM_SECRET"

        [providers.elevenlabs]
        url = "{local_url(BUILTIN['elevenlabs'].url, upstream_port)}"
        ca_file = "{pki['ca']}"
        secret_env = "INJECTING_SECRET"
        """
    proc = SidecarProcess(tempfile.mkdtemp(prefix="conduit-overrides-"), providers, provider_keys(),
                          env={"UPSTREAM_SECRET": SECRET,
                               "INJECTING_SECRET": "abc\r\nX-Injected: 1"}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def origin_sidecar(pki, upstream_port):
    proc = SidecarProcess(tempfile.mkdtemp(prefix="conduit-origins-"), f"""
        [providers.openai]
        url = "{local_url(BUILTIN['openai'].url, upstream_port)}"
        ca_file = "{pki['ca']}"
        secret_env = "UPSTREAM_SECRET"
        """, provider_keys(), extra='allowed_origins = ["http://good.example"]',
        env={"UPSTREAM_SECRET": SECRET}).start()
    yield proc
    proc.stop()


# -- the templates ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_builtin_template_is_the_documented_one(name):
    url, headers = DOCUMENTED[name]
    assert (BUILTIN[name].url, BUILTIN[name].headers) == (url, headers)


def test_every_builtin_is_covered():
    assert set(BUILTIN) == set(DOCUMENTED) == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_request_reaches_the_provider_as_documented(tls_sidecar, pki, upstream_port, name):
    """Exact path, query and headers upstream; the secret where the provider wants it
    (percent-encoded in a URL); the virtual key and the client's headers nowhere."""
    model, want_path, want_headers = CASES[name]
    vkey = tls_sidecar.keys.plain["good"]

    async def body():
        async with TLSUpstream(upstream_port, pki) as up:
            async with connect(client_url(tls_sidecar.port, name, model), open_timeout=10,
                               additional_headers={"Authorization": f"Bearer {vkey}",
                                                   "Cookie": f"session={vkey}",
                                                   "Origin": "http://app.example",
                                                   "X-Anything": vkey}) as ws:
                if name == "gemini":    # its first message names the model, on any path
                    setup = '{"setup": {"model": "models/gemini-live"}}'
                    await ws.send(setup)
                    assert await ws.recv() == '{"type":"session.created"}'
                    assert await ws.recv() == setup                      # echoed
                elif name == "deepgram_agent":  # the provider's greeting first, then Settings
                    assert await ws.recv() == '{"type":"session.created"}'
                    settings = '{"type": "Settings", "agent": {"think": {"provider": {"model": "m"}}}}'
                    await ws.send(settings)
                    assert await ws.recv() == settings
                else:
                    assert await ws.recv() == '{"type":"session.created"}'   # relayed through TLS
                await ws.send(b"\x00\x01pcm")
                assert await ws.recv() == b"\x00\x01pcm"
            return up.seen
    seen = run(body())
    assert len(seen) == 1
    path, headers = seen[0]
    assert path == want_path
    if name == "gemini":
        assert urllib.parse.parse_qs(path.split("?", 1)[1]) == {"key": [SECRET]}
    names = {k.lower() for k in headers.keys()}
    assert names == HANDSHAKE | set(want_headers), dump(path, headers)
    for header, value in want_headers.items():
        assert headers.get_all(header) == [value]
    assert headers["Host"] == f"127.0.0.1:{upstream_port}"
    assert headers["Upgrade"] == "websocket" and headers["Sec-WebSocket-Version"] == "13"
    everything = dump(path, headers)
    assert vkey not in everything
    assert "app.example" not in everything and "session=" not in everything
    assert "OpenAI-Beta" not in headers               # GA interface: no beta header
    if want_headers:                                  # a header secret is not also in the URL
        assert SECRET not in path and SECRET_IN_URL not in path
    else:                                             # a URL secret is in no header
        assert not any(SECRET in v for _, v in headers.raw_items())


def test_client_and_hop_by_hop_headers_are_not_forwarded(tls_sidecar, pki, upstream_port):
    """A hand-written upgrade request full of headers a proxy must not pass on."""
    vkey = tls_sidecar.keys.plain["good"]
    sent = [("Upgrade", "websocket"), ("Connection", "keep-alive, Upgrade"),
            ("Authorization", f"Bearer {vkey}"), ("Cookie", "sid=abc"),
            ("Origin", "http://app.example"), ("X-Anything", "1"), ("User-Agent", "test/1.0"),
            ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="), ("Via", "1.1 proxy"),
            ("Forwarded", "for=10.0.0.1"), ("X-Forwarded-For", "10.0.0.1"),
            ("Accept-Encoding", "gzip"), ("Accept-Language", "en"), ("Cache-Control", "no-cache"),
            ("Pragma", "no-cache"), ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
            ("OpenAI-Beta", "realtime=v1")]

    async def body():
        async with TLSUpstream(upstream_port, pki) as up:
            status, head, reader, writer = await raw_upgrade(
                tls_sidecar.port, "/v1/realtime?model=gpt-realtime&provider=openai", sent)
            first = await asyncio.wait_for(reader.readexactly(2 + 26), 10)
            writer.close()
            return status, head, first, up.seen
    status, head, first, seen = run(body())
    assert status == 101, head
    assert "sec-websocket-extensions" not in header_lines(head)      # no compression
    assert first[2:] == b'{"type":"session.created"}'
    (path, headers), = seen
    assert path == "/v1/realtime?model=gpt-realtime"
    assert {k.lower() for k in headers.keys()} == HANDSHAKE | {"authorization"}, dump(path, headers)
    assert headers["Connection"] == "Upgrade"
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert vkey not in dump(path, headers)


# -- the browser key subprotocol -------------------------------------------------------

def test_browser_key_subprotocol_works_without_authorization(tls_sidecar, pki, upstream_port):
    vkey = tls_sidecar.keys.plain["good"]

    async def body():
        async with TLSUpstream(upstream_port, pki) as up:
            async with connect(client_url(tls_sidecar.port, "openai", "gpt-realtime"),
                               subprotocols=["realtime", f"openai-insecure-api-key.{vkey}"]) as ws:
                assert ws.subprotocol == "realtime"
                assert ws.response.headers.get_all("Sec-WebSocket-Protocol") == ["realtime"]
                assert await ws.recv() == '{"type":"session.created"}'
            return up.seen
    (path, headers), = run(body())
    assert headers.get_all("Sec-WebSocket-Protocol") == ["realtime"]
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert vkey not in dump(path, headers)


def test_the_101_never_echoes_the_key_subprotocol(tls_sidecar, pki, upstream_port):
    """The raw 101, byte for byte: `realtime` selected, the key nowhere in it."""
    vkey = tls_sidecar.keys.plain["good"]

    async def body():
        async with TLSUpstream(upstream_port, pki) as up:
            results = []
            for offered in (f"realtime, openai-insecure-api-key.{vkey}",
                            f"openai-insecure-api-key.{vkey}, realtime",
                            f"openai-insecure-api-key.{vkey}"):
                status, head, reader, writer = await raw_upgrade(
                    tls_sidecar.port, "/v1/realtime/connect?model=gpt-realtime&provider=openai",
                    [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                     ("Sec-WebSocket-Protocol", offered)])
                writer.close()
                results.append((status, head))
            return results, up.seen
    results, seen = run(body())
    for (status, head), (path, headers) in zip(results, seen):
        assert status == 101, head
        assert vkey.encode() not in head
        assert b"openai-insecure-api-key" not in head
        assert vkey not in dump(path, headers)
    assert [header_lines(h).get("sec-websocket-protocol") for _, h in results] == [
        "realtime", "realtime", None]
    assert [h.get_all("Sec-WebSocket-Protocol") for _, h in seen] == [["realtime"], ["realtime"], []]


def test_wrong_key_in_subprotocol_gets_4001_without_echo(tls_sidecar, pki, upstream_port):
    async def body():
        async with TLSUpstream(upstream_port, pki) as up:
            async with connect(client_url(tls_sidecar.port, "openai", "gpt-realtime"),
                               subprotocols=["realtime", "openai-insecure-api-key.condt_wrong"]) as ws:
                assert ws.subprotocol == "realtime"
                assert "condt_wrong" not in str(ws.response.headers)
                code = await first_close(ws)
            return code, up.seen
    code, seen = run(body())
    assert code == (4001, "unknown key")
    assert seen == []                       # the provider was never contacted


# -- allowed_origins -------------------------------------------------------------------

def test_disallowed_origin_gets_403_before_the_upgrade(origin_sidecar, pki, upstream_port):
    vkey = origin_sidecar.keys.plain["good"]

    async def body():
        async with TLSUpstream(upstream_port, pki) as up:
            out = []
            for origin in ("http://evil.example", "http://good.example.evil.example",
                           "https://good.example"):
                status, head, reader, writer = await raw_upgrade(
                    origin_sidecar.port, "/v1/realtime/connect?model=gpt-realtime&provider=openai",
                    [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                     ("Sec-WebSocket-Protocol", f"realtime, openai-insecure-api-key.{vkey}")]
                    + ([("Origin", origin)] if origin else []))
                rest = await asyncio.wait_for(reader.read(), 10)    # the sidecar closes
                writer.close()
                out.append((status, head, rest))
            return out, up.seen
    out, seen = run(body())
    for status, head, rest in out:
        assert status == 403, head
        assert b"upgrade" not in head.lower().split(b"\r\n", 1)[1]     # no Upgrade header
    assert seen == []


def test_clients_without_an_origin_pass_allowed_origins(origin_sidecar, pki, upstream_port):
    """SDKs and servers send no Origin; allowed_origins only guards against other sites."""
    vkey = origin_sidecar.keys.plain["good"]

    async def body():
        async with TLSUpstream(upstream_port, pki):
            async with connect(client_url(origin_sidecar.port, "openai", "gpt-realtime"),
                               additional_headers={"Authorization": f"Bearer {vkey}"}) as ws:
                return await ws.recv()
    assert run(body()) == '{"type":"session.created"}'


def test_allowed_origin_works_and_is_not_forwarded(origin_sidecar, pki, upstream_port):
    vkey = origin_sidecar.keys.plain["good"]

    async def body():
        async with TLSUpstream(upstream_port, pki) as up:
            async with connect(client_url(origin_sidecar.port, "openai", "gpt-realtime"),
                               origin="http://good.example",
                               subprotocols=["realtime", f"openai-insecure-api-key.{vkey}"]) as ws:
                assert await ws.recv() == '{"type":"session.created"}'
            return up.seen
    (path, headers), = run(body())
    assert "Origin" not in headers


# -- the override rules, live ----------------------------------------------------------

def test_azure_resource_goes_into_the_host(override_sidecar, pki, upstream_port):
    async def body():
        async with TLSUpstream(upstream_port, pki) as up:
            async with connect(client_url(override_sidecar.port, "azure", "my-deployment"),
                               additional_headers=override_sidecar.auth()) as ws:
                await ws.recv()
            return up.seen
    (path, headers), = run(body())
    assert headers["Host"] == f"127.0.0.1:{upstream_port}"
    assert path == "/openai/v1/realtime?model=my-deployment"
    assert headers["api-key"] == SECRET                    # the template's header, kept


def test_headers_override_replaces_the_template_headers(override_sidecar, pki, upstream_port):
    async def body():
        async with TLSUpstream(upstream_port, pki) as up:
            async with connect(client_url(override_sidecar.port, "deepgram", "nova-3"),
                               additional_headers=override_sidecar.auth()) as ws:
                await ws.recv()
            return up.seen
    (path, headers), = run(body())
    assert path == "/v1/listen?model=nova-3"
    assert {k.lower() for k in headers.keys()} == HANDSHAKE | {"authorization", "x-team"}
    assert headers["Authorization"] == f"Bearer {SECRET}" and headers["X-Team"] == "voice"


def test_secret_with_crlf_is_refused_not_sent(override_sidecar, pki, upstream_port):
    async def body():
        async with TLSUpstream(upstream_port, pki) as up:
            async with connect(client_url(override_sidecar.port, "elevenlabs", "agent"),
                               additional_headers=override_sidecar.auth()) as ws:
                code = await first_close(ws)
            return code, up.seen
    (code, reason), seen = run(body())
    assert code == 1011 and "control character" in reason
    assert seen == []


def _config_faults(mock_provider, workdir: str, providers: dict[str, str]) -> tuple[dict, dict]:
    """A sidecar with `providers` (name -> its secret and CA lines, at the mock's URL,
    over wss with a ca_file): each one's close to a session, and the `error` of its
    `outcome=config` log line."""
    keys = Keys()
    keys.add("good")
    url = f"ws://127.0.0.1:{mock_provider.port}/v1/realtime?model={{model}}"
    toml = "".join(
        f'[providers.{name}]\nurl = "{url.replace("ws:", "wss:") if "ca_file" in lines else url}"\n'
        f'headers = {{ Authorization = "Bearer {{secret}}" }}\n{lines}\n'
        for name, lines in providers.items()
    )
    proc = SidecarProcess(workdir, toml, keys).start()
    try:
        async def body(provider):
            async with connect(proc.url(provider=provider), additional_headers=proc.auth()) as ws:
                return await first_close(ws)
        closes = {name: run(body(name), timeout=10) for name in providers}
        errors = {line["provider"]: line.get("error")
                  for line in proc.wait_lines(lambda line: line.get("outcome") == "config", len(providers))}
    finally:
        proc.stop()
    return closes, errors


def test_an_unavailable_secret_is_logged_with_where_it_was_looked_for(mock_provider):
    """The log said only 'provider secret unavailable' (or 'CA file'): not which file
    or variable, nor why (a Secret mounted unreadable for the sidecar's user, a
    missing key)."""
    workdir = tempfile.mkdtemp(prefix="conduit-secret-")
    missing = os.path.join(workdir, "no-such-secret")
    not_pem = os.path.join(workdir, "ca.pem")
    with open(not_pem, "w") as f:
        f.write("not a certificate\n")
    quoted = os.path.join(workdir, "quoted-secret")
    with open(quoted, "w", encoding="utf-8") as f:
        f.write("sk-\u2019pasted")
    empty = os.path.join(workdir, "empty-secret")  # a Secret made without its value
    with open(empty, "w") as f:
        f.write("\n")
    closes, errors = _config_faults(mock_provider, workdir, {
        "by_file": f'secret_file = "{missing}"',
        "by_env": 'secret_env = "CONDUIT_TEST_UNSET_SECRET"',
        "by_quoted": f'secret_file = "{quoted}"',
        "by_empty": f'secret_file = "{empty}"',
        "by_ca": f'secret_env = "PROVIDER_KEY"\nca_file = "{not_pem}"'})
    assert closes == {"by_file": (1011, "provider secret unavailable"),
                      "by_env": (1011, "provider secret unavailable"),
                      "by_quoted": (1011, "provider secret unavailable"),
                      "by_empty": (1011, "provider secret unavailable"),
                      "by_ca": (1011, "provider CA file unavailable")}
    assert errors == {"by_file": f"secret_file {missing}: No such file or directory",
                      "by_env": "secret_env CONDUIT_TEST_UNSET_SECRET is not set",
                      "by_quoted": f"secret_file {quoted}: a character outside ASCII",
                      "by_empty": f"secret_file {empty}: empty",
                      "by_ca": f"ca_file {not_pem}: no PEM certificates"}


def test_a_secret_or_ca_file_that_is_a_fifo_does_not_hold_the_sidecar(mock_provider):
    """A FIFO where a provider's secret or CA file should be (mounted by mistake, or
    a path mistyped to one): the first session's open waited for a writer on the
    event loop, and the whole sidecar hung (sessions, /healthz, SIGTERM), as the
    key file's reader already refused to."""
    workdir = tempfile.mkdtemp(prefix="conduit-fifo-")
    secret_fifo, ca_fifo = os.path.join(workdir, "secret"), os.path.join(workdir, "ca.pem")
    os.mkfifo(secret_fifo)
    os.mkfifo(ca_fifo)
    closes, errors = _config_faults(mock_provider, workdir, {
        "by_file": f'secret_file = "{secret_fifo}"',
        "by_ca": f'secret_env = "PROVIDER_KEY"\nca_file = "{ca_fifo}"'})
    assert closes == {"by_file": (1011, "provider secret unavailable"),
                      "by_ca": (1011, "provider CA file unavailable")}
    assert errors == {"by_file": f"secret_file {secret_fifo}: not a regular file",
                      "by_ca": f"ca_file {ca_fifo}: not a regular file"}


def test_model_with_crlf_is_refused(override_sidecar):
    async def body():
        status, head, reader, writer = await raw_upgrade(
            override_sidecar.port, "/v1/realtime/connect?provider=deepgram&model=a%0D%0AX-Injected:%201",
            [("Upgrade", "websocket"), ("Connection", "Upgrade")] + list(override_sidecar.auth().items()))
        text = await reader.readexactly(int(header_lines(head)["content-length"]))
        writer.close()
        return status, text
    status, text = run(body())
    assert status == 400 and b"control characters in the request target" in text, text


def test_builtin_without_a_section_is_not_routable(override_sidecar):
    async def body():
        async with connect(client_url(override_sidecar.port, "openai", "gpt-realtime"),
                           additional_headers=override_sidecar.auth()) as ws:
            return await first_close(ws)
    assert run(body()) == (4004, "unknown provider 'openai'")


# -- the override rules, through the CLI and the router --------------------------------

def write_config(text: str) -> str:
    directory = tempfile.mkdtemp(prefix="conduit-cfg-")
    keys = os.path.join(directory, "keys.json")
    provider_keys().write(keys)
    path = os.path.join(directory, "config.toml")
    with open(path, "w") as f:
        f.write(f'keys_file = "{keys}"\n' + textwrap.dedent(text))
    return path


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conduit_sidecar", *args], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "UPSTREAM_SECRET": SECRET})


def providers_listing(config: str) -> dict[str, list[str]]:
    """`conduit-sidecar providers --config X`, as {name: [state + url, header lines...]}."""
    result = cli("providers", "--config", config)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr and SECRET_IN_URL not in result.stdout
    listing: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        if line[:1].strip():
            name, rest = line.split(None, 1)
            listing[name] = [" ".join(rest.split())]
        else:
            listing[name].append(line.strip())
    return listing


def test_secret_only_gets_the_builtin_url_and_headers():
    secret_file = os.path.join(tempfile.mkdtemp(prefix="conduit-secret-"), "openai")
    with open(secret_file, "w") as f:
        f.write(SECRET + "\n")
    config = write_config(f"""
        [providers.openai]
        secret_file = "{secret_file}"
        [providers.gemini]
        secret_env = "UPSTREAM_SECRET"
        """)
    listing = providers_listing(config)
    assert set(listing) == set(BUILTIN)
    assert listing["openai"] == ["configured wss://api.openai.com/v1/realtime?model={model}",
                                 "Authorization: Bearer ***"]
    assert listing["gemini"] == [
        "configured wss://generativelanguage.googleapis.com/ws/google.ai.generativelanguage."
        "v1beta.GenerativeService.BidiGenerateContent?key=***"]
    for name in set(BUILTIN) - {"openai", "gemini"}:
        assert listing[name][0].startswith("needs a secret wss://"), listing[name]
    # The router fills in the secret from the file, and percent-encodes it in the URL.
    router = Router(config_mod.load(config), environ={"UPSTREAM_SECRET": SECRET})
    openai = router.upstream(router.route("gpt-realtime", "openai"), "gpt-realtime")
    assert (openai.uri.host, openai.uri.port, openai.uri.resource_name) == (
        "api.openai.com", 443, "/v1/realtime?model=gpt-realtime")
    assert openai.headers == [("Authorization", f"Bearer {SECRET}")]
    gemini = router.upstream(router.route(None, "gemini"), None)
    assert gemini.uri.resource_name.endswith(f"BidiGenerateContent?key={SECRET_IN_URL}")
    assert gemini.headers == [] and openai.ssl is not None
    # check-config shows the configured providers, masked too.
    checked = cli("check-config", "--config", config)
    assert checked.returncode == 0, checked.stderr
    assert "openai" in checked.stdout and SECRET not in checked.stdout + checked.stderr


def test_each_field_overrides_the_template_on_its_own():
    config = write_config("""
        [providers.deepgram]                 # headers only
        secret_env = "UPSTREAM_SECRET"
        headers = { Authorization = "Bearer {secret}" }

        [providers.openai]                   # models only
        secret_env = "UPSTREAM_SECRET"
        models = ["gpt-realtime*"]

        [providers.elevenlabs]               # url only
        secret_env = "UPSTREAM_SECRET"
        url = "wss://api.eu.residency.elevenlabs.io/v1/convai/conversation?agent_id={model}"
        """)
    listing = providers_listing(config)
    assert listing["deepgram"] == ["configured wss://api.deepgram.com/v1/listen?model={model}",
                                   "Authorization: Bearer ***"]
    assert listing["openai"] == ["configured wss://api.openai.com/v1/realtime?model={model}",
                                 "Authorization: Bearer ***"]
    assert listing["elevenlabs"] == [
        "configured wss://api.eu.residency.elevenlabs.io/v1/convai/conversation?agent_id={model}",
        "xi-api-key: ***"]
    router = Router(config_mod.load(config), environ={"UPSTREAM_SECRET": SECRET})
    assert router.route("gpt-realtime-mini", None).name == "openai"      # the models route
    deepgram = router.upstream(router.route("nova-3", "deepgram"), "nova-3")
    assert deepgram.headers == [("Authorization", f"Bearer {SECRET}")]
    assert deepgram.uri.host == "api.deepgram.com"


def test_azure_needs_its_resource():
    missing = write_config("""
        [providers.azure]
        secret_env = "UPSTREAM_SECRET"
        """)
    result = cli("providers", "--config", missing)
    assert result.returncode == 1
    assert "needs resource" in result.stderr and "providers.azure" in result.stderr

    config = write_config("""
        [providers.azure]
        secret_env = "UPSTREAM_SECRET"
        resource = "contoso-voice"
        """)
    listing = providers_listing(config)
    assert listing["azure"] == [
        "configured wss://{resource}.openai.azure.com/openai/v1/realtime?model={model}",
        "api-key: ***"]
    router = Router(config_mod.load(config), environ={"UPSTREAM_SECRET": SECRET})
    azure = router.upstream(router.route("gpt-realtime", "azure"), "gpt-realtime")
    assert (azure.uri.host, azure.uri.port, azure.uri.resource_name) == (
        "contoso-voice.openai.azure.com", 443, "/openai/v1/realtime?model=gpt-realtime")
    assert azure.headers == [("api-key", SECRET)]
