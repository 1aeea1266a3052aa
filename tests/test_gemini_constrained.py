"""Gemini's ephemeral-token method (`...GenerativeService.BidiGenerateContentConstrained`)
through the sidecar to the gemini mock. google-genai and @google/genai take it only for
a key starting `auth_tokens/`, so the app hands them `auth_tokens/` and its virtual key
where an ephemeral token's name would go; the provider gets its plain
BidiGenerateContent at the same API version, with the real key."""

from __future__ import annotations

import urllib.parse

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import PROVIDER_SECRET, run
# The fixtures too: this module gets its own sidecar and mocks, configured as theirs.
from test_native_sdks import (_closed_with, _last_request, last_session, log_mark, metric,  # noqa: F401
                              native, node, sidecar_ca_bundle)

CONSTRAINED = "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContentConstrained"
UPSTREAM = ("/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContent"
            "?key=" + urllib.parse.quote(PROVIDER_SECRET, safe=""))
MODEL = "gemini-2.5-flash-live"


def _talk(native, api_key: str, model: str = MODEL) -> list[str]:
    """One text turn with google-genai over the TLS listener (it dials wss:// only); the
    SDK's ephemeral-token warning shows it took the Constrained method."""
    from google import genai
    from google.genai.errors import ExperimentalWarning
    client = genai.Client(api_key=api_key, http_options={
        "base_url": f"https://127.0.0.1:{native.tls_port}", "api_version": "v1alpha"})

    async def body():
        texts = []
        async with client.aio.live.connect(model=model, config={"response_modalities": ["TEXT"]}) as session:
            await session.send_client_content(
                turns={"role": "user", "parts": [{"text": "hello there"}]}, turn_complete=True)
            async for message in session.receive():
                if message.text:
                    texts.append(message.text)
        return texts
    with pytest.warns(ExperimentalWarning, match="ephemeral token"):
        return run(body())


def _requests(native) -> int:
    return len(native.mocks["gemini"].mock.requests)


def test_python_sdk_with_a_virtual_key_for_the_ephemeral_token(native, sidecar_ca_bundle):
    mark = log_mark(native)
    labels = dict(key_id="gemini-flash", provider="gemini", model=MODEL)
    before = metric(native, "conduit_usage_tokens_total", kind="input", **labels)
    assert _talk(native, "auth_tokens/" + native.keys.plain["gemini-flash"]) == ["echo: hello there"]
    path, headers = _last_request(native, "gemini")
    # The SDK sent the token as `Authorization: Token` (and x-goog-api-key): neither goes up.
    assert path == UPSTREAM
    assert "condt_" not in path + str(headers.raw_items()) and "Authorization" not in headers
    end = last_session(native, "gemini", mark)
    assert (end["key_id"], end["model"]) == ("gemini-flash", MODEL)
    assert metric(native, "conduit_usage_tokens_total", kind="input", **labels) == before + 5


def test_python_sdk_model_not_allowed_gets_4003(native, sidecar_ca_bundle):
    from google.genai import errors
    before = _requests(native)
    with pytest.raises(errors.APIError) as exc:
        _talk(native, "auth_tokens/" + native.keys.plain["gemini-flash"], "gemini-2.5-pro-live")
    assert exc.value.code == 4003 and "'gemini-2.5-pro-live' not allowed" in str(exc.value)
    assert _requests(native) == before


@pytest.mark.parametrize("token", ["auth_tokens/condt_wrong", "auth_tokens/a-real-ephemeral-token"])
def test_python_sdk_with_a_token_that_is_no_virtual_key_gets_4001(native, sidecar_ca_bundle, token):
    """Google's own ephemeral tokens are not the sidecar's to check: unknown keys."""
    from google.genai import errors
    before = _requests(native)
    with pytest.raises((errors.APIError, ConnectionClosed)) as exc:
        _talk(native, token)
    # APIError, or the close itself when it came before the SDK sent its setup.
    err = exc.value
    code, reason = (err.code, str(err)) if isinstance(err, errors.APIError) else (err.rcvd.code, err.rcvd.reason)
    assert code == 4001 and "unknown key" in reason
    assert _requests(native) == before


def test_node_sdk_with_a_virtual_key_for_the_ephemeral_token(native):
    """@google/genai sends the token as ?access_token=, unencoded; it is dropped."""
    out = node("gemini_live_test.mjs", f"http://127.0.0.1:{native.port}",
               "auth_tokens/" + native.keys.plain["gemini-flash"], MODEL, "v1alpha")
    assert out["texts"] == ["echo: hello node"] and out["turnComplete"], out
    path, headers = _last_request(native, "gemini")
    assert path == UPSTREAM and "condt_" not in str(headers.raw_items())


def test_a_bare_virtual_key_in_access_token_and_the_forms_not_read(native):
    """A hand-written client (Google's docs: ?access_token=TOKEN) may give the bare key.
    The API key forms of BidiGenerateContent are not read here: a virtual key in ?key=
    is refused (400), one in x-goog-api-key is no key (4001)."""
    key = native.keys.plain["good"]

    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}{CONSTRAINED}?access_token={key}") as ws:
            await ws.send('{"setup": {"model": "models/gemini-x"}}')
            return (await ws.recv()).decode()
    assert "setupComplete" in run(body())
    assert _last_request(native, "gemini")[0] == UPSTREAM
    before = _requests(native)
    with pytest.raises(InvalidStatus) as exc:
        _closed_with(native, f"{CONSTRAINED}?key={key}")
    assert exc.value.response.status_code == 400
    assert _closed_with(native, CONSTRAINED, {"x-goog-api-key": key}) == (4001, "missing key")
    assert _requests(native) == before
