"""python openai_agents_session.py BASE KEY: one openai-agents realtime session (a
RealtimeAgent run by a RealtimeRunner, the model config's `url` and `api_key` set to
the sidecar and the virtual key), one user text message, its turn to the end. Prints
the session's event types (raw model events by their own type) as JSON.

Runs in its own virtualenv (see scripts/test.sh): openai-agents pins websockets<17."""

import asyncio
import json
import sys

from agents.realtime import RealtimeAgent, RealtimeRunner
from websockets.exceptions import ConnectionClosed


async def main(base: str, key: str) -> dict:
    url = f"{base}/v1/realtime?model=mock-realtime"
    runner = RealtimeRunner(RealtimeAgent(name="Assistant", instructions="Answer briefly."),
                            config={"model_settings": {"model_name": "mock-realtime",
                                                       "output_modalities": ["text"]}})
    seen = []
    try:
        async with asyncio.timeout(15), await runner.run(
                model_config={"url": url, "api_key": key}) as session:
            await session.send_message("Hello")
            async for event in session:
                if event.type != "raw_model_event":
                    seen.append(event.type)
                elif event.data.type == "raw_server_event":     # the provider's own events
                    seen.append(f"server:{event.data.data.get('type')}")
                if event.type == "error":
                    seen.append(repr(event.error))
                if event.type == "agent_end":
                    return {"seen": seen, "end": "agent_end"}
        return {"seen": seen, "end": "closed"}
    except TimeoutError:
        return {"seen": seen, "end": "timeout"}
    except ConnectionClosed as e:       # the sidecar refuses a key after the upgrade
        return {"seen": seen, "end": "closed", "close": [e.rcvd.code, e.rcvd.reason]}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:3]))))
