"""python livekit_session.py BASE KEY: LiveKit's OpenAI realtime plugin without a
LiveKit server: `RealtimeModel(base_url=..., api_key=...)`'s RealtimeSession driven
directly (update_instructions, generate_reply), to the generation's end. Prints the
provider's event types and the generated text as JSON.

Runs in its own virtualenv (see scripts/test.sh), beside openai-agents."""

import asyncio
import json
import sys

from livekit.plugins.openai.realtime import RealtimeModel


async def main(base: str, key: str) -> dict:
    model = RealtimeModel(model="mock-realtime", base_url=f"{base}/v1", api_key=key,
                          modalities=["text"])
    session = model.session()
    seen, errors = [], []
    session.on("openai_server_event_received", lambda event: seen.append(event["type"]))
    session.on("error", lambda event: errors.append(str(event.error)))
    end = "done"
    try:
        async with asyncio.timeout(15):
            await session.update_instructions("Answer briefly.")
            generation = await session.generate_reply(instructions="Say hello.")
            async for message in generation.message_stream:    # ends with response.done
                async for _ in message.text_stream:
                    pass
    except TimeoutError:
        end = "timeout"
    except Exception as e:       # the plugin's own error types (RealtimeError, APIError)
        end, errors = "error", [*errors, repr(e)]
    finally:
        await session.aclose()
        await model.aclose()
    return {"end": end, "seen": seen, "errors": errors}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:3]))))
