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
import tempfile
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from . import _relay, config as config_mod
from .keys import KeySet, KeyEntry, hash_key, new_key
from .mock import MockProvider
from .server import Sidecar

FRAME_BYTES = 960        # 20 ms of 24 kHz mono PCM16


def _tone(seconds: float) -> list[bytes]:
    samples = [int(8000 * math.sin(2 * math.pi * 440 * i / 24000)) for i in range(int(24000 * seconds))]
    pcm = struct.pack(f"<{len(samples)}h", *samples)
    return [pcm[i:i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


async def run(seconds: float = 3.0) -> dict:
    key = new_key()
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = os.path.join(tmp, "keys.json")
        with open(keys_file, "w") as f:
            json.dump({"keys": [{"id": "demo", "sha256": hash_key(key)}]}, f)
        async with MockProvider() as mock:
            conf = config_mod.load(None, environ={}, overrides={
                "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "keys_file": keys_file,
                "providers": {"mock": {"url": mock.url + "/v1/realtime?model={model}",
                                       "models": ["mock-*"]}}})
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
    async with connect(url, additional_headers={"Authorization": f"Bearer {key}"},
                       compression=None, max_size=None) as ws:
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
                audio = base64.b64encode(b"".join(frames[seq - 49:seq + 1])).decode()
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
        "audio_frames_sent": len(frames), "audio_frames_echoed": len(rtts),
        "frames_client_to_upstream": sum(frames_t[0]), "frames_upstream_to_client": sum(frames_t[1]),
        "bytes_client_to_upstream": wire[0], "bytes_upstream_to_client": wire[1],
        "rtt_ms_p50": statistics.median(ms), "rtt_ms_p99": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "events": sorted(set(events)), "close_normal": normal_close, "close_wrong_key": bad_close,
    }


def print_summary(s: dict) -> None:
    print("conduit-sidecar demo: mock provider <- sidecar <- client, all on 127.0.0.1")
    print(f"  audio: {s['audio_frames_sent']} x {FRAME_BYTES} B frames (24 kHz PCM16, 20 ms), "
          f"{s['audio_frames_echoed']} echoed back")
    print(f"  relayed client->upstream: {s['frames_client_to_upstream']} frames, "
          f"{s['bytes_client_to_upstream']} bytes")
    print(f"  relayed upstream->client: {s['frames_upstream_to_client']} frames, "
          f"{s['bytes_upstream_to_client']} bytes")
    print(f"  round trip: p50 {s['rtt_ms_p50']:.3f} ms, p99 {s['rtt_ms_p99']:.3f} ms")
    print(f"  provider events: {', '.join(s['events'])}")
    print(f"  close codes: session {s['close_normal']}, wrong key {s['close_wrong_key'][0]} "
          f"({s['close_wrong_key'][1]})")
