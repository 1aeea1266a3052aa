"""`conduit-sidecar demo`: the sidecar and the mock provider on loopback, a
generated key, a few seconds of 24 kHz PCM16 audio in 20 ms binary frames plus
OpenAI-style JSON events through it, and a summary. No network, no secrets."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import statistics
import struct
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from . import _relay, config as config_mod
from .keys import KeyEntry, KeySet, hash_key, new_key
from .mock import MockProvider
from .routing import Router
from .server import Sidecar

FRAME_BYTES = 960  # 20 ms of 24 kHz mono PCM16


def _tone(seconds: float) -> list[bytes]:
    samples = [int(8000 * math.sin(2 * math.pi * 440 * i / 24000)) for i in range(int(24000 * seconds))]
    pcm = struct.pack(f"<{len(samples)}h", *samples)
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


def _config(providers: dict) -> config_mod.Config:
    """Loopback on free ports; the key set is given to the Sidecar, not read from a file."""
    return config_mod.load(
        None,
        environ={},
        overrides={
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "keys_file": os.devnull,
            "providers": providers,
        },
    )


async def run(seconds: float = 3.0) -> dict:
    key = new_key()
    async with MockProvider() as mock:
        conf = _config({"mock": {"url": mock.url + "/v1/realtime?model={model}", "models": ["mock-*"]}})
        sidecar = Sidecar(conf, KeySet([KeyEntry("demo", hash_key(key))]))
        await sidecar.start()
        try:
            return await _session(sidecar, key, seconds)
        finally:
            await sidecar.stop()


async def _session(sidecar: Sidecar, key: str, seconds: float) -> dict:
    host, port = sidecar.listening["listen"]
    url = f"ws://{host}:{port}/v1/realtime/connect?model=mock-realtime&provider=mock"
    frames = _tone(seconds)
    sent_at: dict[int, float] = {}
    rtts: list[float] = []
    events: list[str] = []
    async with connect(
        url, additional_headers={"Authorization": f"Bearer {key}"}, compression=None, max_size=None
    ) as ws:

        async def receive():
            async for message in ws:
                if isinstance(message, bytes):
                    (seq,) = struct.unpack_from("<I", message)
                    rtts.append(time.perf_counter() - sent_at.pop(seq))
                else:
                    events.append(json.loads(message)["type"])
                    if events[-1] == "response.done":
                        return

        receiver = asyncio.create_task(receive())
        await ws.send(json.dumps({"type": "session.update", "session": {"voice": "alloy"}}))
        start = time.perf_counter()
        for seq, frame in enumerate(frames):
            # Pace in real time, like a microphone.
            await asyncio.sleep(max(0.0, start + seq * 0.02 - time.perf_counter()))
            sent_at[seq] = time.perf_counter()
            await ws.send(struct.pack("<I", seq) + frame[4:])
            if seq % 50 == 49:
                audio = base64.b64encode(b"".join(frames[seq - 49 : seq + 1])).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await asyncio.wait_for(receiver, 10)
    normal_close = ws.close_code
    # A wrong key: the sidecar completes the upgrade and closes with 4001.
    try:
        async with connect(url, additional_headers={"Authorization": "Bearer condt_wrong"}) as bad:
            await bad.recv()
    except ConnectionClosed as exc:
        bad_close = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")
    await asyncio.sleep(0.05)
    frames_t, _, wire, _, _ = _relay.totals()
    ms = sorted(r * 1000 for r in rtts)
    return {
        "audio_frames_sent": len(frames),
        "audio_frames_echoed": len(rtts),
        "frames_client_to_upstream": sum(frames_t[0]),
        "frames_upstream_to_client": sum(frames_t[1]),
        "bytes_client_to_upstream": wire[0],
        "bytes_upstream_to_client": wire[1],
        "rtt_ms_p50": statistics.median(ms),
        "rtt_ms_p99": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "events": sorted(set(events)),
        "close_normal": normal_close,
        "close_wrong_key": bad_close,
    }


def print_summary(s: dict) -> None:
    print("conduit-sidecar demo: mock provider <- sidecar <- client, all on 127.0.0.1")
    print(
        f"  audio: {s['audio_frames_sent']} x {FRAME_BYTES} B frames (24 kHz PCM16, 20 ms), "
        f"{s['audio_frames_echoed']} echoed back"
    )
    print(
        f"  relayed client->upstream: {s['frames_client_to_upstream']} frames, "
        f"{s['bytes_client_to_upstream']} bytes"
    )
    print(
        f"  relayed upstream->client: {s['frames_upstream_to_client']} frames, "
        f"{s['bytes_upstream_to_client']} bytes"
    )
    print(f"  round trip: p50 {s['rtt_ms_p50']:.3f} ms, p99 {s['rtt_ms_p99']:.3f} ms")
    print(f"  provider events: {', '.join(s['events'])}")
    print(
        f"  close codes: session {s['close_normal']}, wrong key {s['close_wrong_key'][0]} "
        f"({s['close_wrong_key'][1]})"
    )


# -- `demo --provider NAME`: one session in a provider's own shape -------------------

# The template each provider's mock stands in for (the same path, a loopback host).
_NATIVE_URLS = {
    "azure": "/openai/v1/realtime?model={model}",
    "gemini": "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent?key={secret}",
    "deepgram": "/v1/listen?model={model}",
    "deepgram_agent": "/v1/agent/converse",
    "assemblyai": "/v3/ws?speech_model={model}",
    "elevenlabs": "/v1/convai/conversation?agent_id={model}",
}


async def run_provider(name: str) -> dict:
    """The sidecar and `name`'s mock provider; one session as that provider's SDK sends it."""
    key = new_key()
    async with MockProvider(shape=name) as mock:
        conf = _config({name: {"url": mock.url + _NATIVE_URLS[name], "secret_env": "DEMO_SECRET"}})
        sidecar = Sidecar(
            conf,
            KeySet([KeyEntry("demo", hash_key(key))]),
            Router(conf, environ={"DEMO_SECRET": "demo-provider-secret"}),
        )
        await sidecar.start()
        try:
            host, port = sidecar.listening["listen"]
            events, close = await _NATIVE_SESSIONS[name](f"ws://{host}:{port}", key)
            await asyncio.sleep(0.05)
            upstream = mock.requests[-1][0]
        finally:
            await sidecar.stop()
    usage = {
        s.labels["kind"]: s.value
        for metric in sidecar.metrics.registry.collect()
        if metric.name in ("conduit_usage_tokens", "conduit_usage_seconds")
        for s in metric.samples
        if s.name.endswith("_total")
    }
    return {"provider": name, "events": events, "close": close, "upstream_request": upstream, "usage": usage}


async def _frames(ws, stop) -> list[str]:
    """Event names until `stop(event)`; JSON in text or binary frames."""
    names = []
    async for message in ws:
        event = json.loads(message)
        names.append(event.get("type") or next(iter(event)))
        if stop(event):
            break
    return names


async def _gemini(base: str, key: str):
    url = base + _NATIVE_URLS["gemini"].replace("{secret}", key)
    async with connect(url) as ws:
        await ws.send(json.dumps({"setup": {"model": "models/gemini-live-demo"}}))
        await ws.send(
            json.dumps(
                {
                    "clientContent": {
                        "turns": [{"role": "user", "parts": [{"text": "hello"}]}],
                        "turnComplete": True,
                    }
                }
            )
        )
        events = await _frames(ws, lambda e: e.get("serverContent", {}).get("turnComplete"))
    return events, ws.close_code


async def _pcm_stream(url: str, headers: dict, rate: int, end: dict):
    async with connect(url, additional_headers=headers) as ws:
        for _ in range(50):
            await ws.send(bytes(rate * 2 // 50))  # 20 ms of PCM16
        await ws.send(json.dumps(end))
        events = await _frames(ws, lambda e: False)
    return events, ws.close_code


async def _deepgram(base: str, key: str):
    return await _pcm_stream(
        base + "/v1/listen?model=nova-3&encoding=linear16&sample_rate=16000",
        {"Authorization": f"Token {key}"},
        16000,
        {"type": "CloseStream"},
    )


async def _deepgram_agent(base: str, key: str):
    settings = {
        "type": "Settings",
        "audio": {"input": {"encoding": "linear16", "sample_rate": 16000}},
        "agent": {
            "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
            "think": {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}},
            "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
        },
    }
    async with connect(
        base + _NATIVE_URLS["deepgram_agent"], additional_headers={"Authorization": f"Token {key}"}
    ) as ws:
        names = [json.loads(await ws.recv())["type"]]  # Welcome: Deepgram's guide sends nothing before it
        await ws.send(json.dumps(settings))
        for _ in range(50):
            await ws.send(bytes(640))  # 20 ms of 16 kHz PCM16
        async for message in ws:
            names.append("audio" if isinstance(message, bytes) else json.loads(message)["type"])
            if names[-1] == "AgentAudioDone":
                break
    return names, ws.close_code


async def _assemblyai(base: str, key: str):
    return await _pcm_stream(
        base + "/v3/ws?speech_model=u3-rt-pro&sample_rate=16000",
        {"Authorization": key},
        16000,
        {"type": "Terminate"},
    )


async def _elevenlabs(base: str, key: str):
    import urllib.request

    request = urllib.request.Request(
        base.replace("ws:", "http:") + "/v1/convai/conversation/get-signed-url?agent_id=demo-agent",
        headers={"xi-api-key": key},
    )
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=5).read())
    async with connect(json.loads(body)["signed_url"]) as ws:  # no key: the signed URL
        await ws.send(json.dumps({"type": "conversation_initiation_client_data"}))
        await ws.send(json.dumps({"type": "user_message", "text": "hello"}))
        events = await _frames(ws, lambda e: e["type"] == "agent_response")
    return events, ws.close_code


async def _azure(base: str, key: str):
    async with connect(
        base + "/openai/realtime?api-version=2025-04-01-preview&deployment=demo",
        additional_headers={"api-key": key},
    ) as ws:
        await ws.send(
            json.dumps(
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(48000)).decode()}
            )
        )
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events = await _frames(ws, lambda e: e["type"] == "response.done")
    return events, ws.close_code


_NATIVE_SESSIONS = {
    "gemini": _gemini,
    "deepgram": _deepgram,
    "deepgram_agent": _deepgram_agent,
    "assemblyai": _assemblyai,
    "elevenlabs": _elevenlabs,
    "azure": _azure,
}


def print_provider_summary(s: dict) -> None:
    print(
        f"conduit-sidecar demo: {s['provider']} mock <- sidecar <- {s['provider']}-shaped "
        "client, all on 127.0.0.1"
    )
    print(f"  provider events: {', '.join(s['events'])}")
    print(f"  provider got: {s['upstream_request']}")
    print(f"  metered: {s['usage'] or 'nothing'}")
    print(f"  close code: {s['close']}")
