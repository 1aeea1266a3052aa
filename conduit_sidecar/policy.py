"""Governance arithmetic, without I/O: prices and cost, UTC budget windows, and the
words a client is told when a limit ends its session."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import msgspec

from .config import Price
from .keys import Budget, match

__all__ = [
    "METRICS",
    "WINDOWS",
    "budget_reason",
    "cost_usd",
    "error_event",
    "figure",
    "notice",
    "over_budget",
    "price_for",
    "window_bounds",
]

METRICS = ("tokens", "audio_seconds", "usd")
WINDOWS = ("hour", "day", "month")
_STAMP = {"hour": "%Y%m%d%H", "day": "%Y%m%d", "month": "%Y%m"}


def price_for(prices: dict[str, Price], model: str | None) -> Price | None:
    """The price of `model`: an exact pattern wins, else the longest matching prefix*."""
    if model is None:
        return None
    if model in prices:
        return prices[model]
    best = max((p for p in prices if p.endswith("*") and match(p, model)), key=len, default=None)
    return prices[best] if best is not None else None


def cost_usd(price: Price, tokens: dict[str, float], audio_seconds: float = 0.0) -> float:
    """USD for one usage report. Cached input tokens are part of the input text, audio
    and image counts (`input_cached_audio` and `input_cached_image` of them audio and
    images, the rest text) and billed at input_cached instead."""
    cached_audio = min(tokens.get("input_cached_audio", 0), tokens.get("input_audio", 0))
    cached_image = min(tokens.get("input_cached_image", 0), tokens.get("input_image", 0))
    cached_text = min(
        tokens.get("input_cached", 0) - cached_audio - cached_image, tokens.get("input_text", 0)
    )
    image = price.input_text if price.input_image is None else price.input_image
    per_million = (
        (tokens.get("input_text", 0) - cached_text) * price.input_text
        + (cached_text + cached_audio + cached_image) * price.input_cached
        + (tokens.get("input_audio", 0) - cached_audio) * price.input_audio
        + (tokens.get("input_image", 0) - cached_image) * image
        + tokens.get("output_text", 0) * price.output_text
        + tokens.get("output_audio", 0) * price.output_audio
    )
    return per_million / 1e6 + audio_seconds / 60 * price.audio_minute


def window_bounds(window: str, now: dt.datetime) -> tuple[str, dt.datetime]:
    """(stamp naming the UTC calendar window that holds `now`, the window's end)."""
    now = now.astimezone(dt.UTC)
    if window == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(hours=1)
    elif window == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
    else:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + dt.timedelta(days=32)).replace(day=1)
    return start.strftime(_STAMP[window]), end


def over_budget(budgets: list[Budget], totals: dict[str, dict[str, float]], now: dt.datetime) -> str | None:
    """The close reason for the first budget whose window total reached its limit, or
    None. `totals` maps a window to its metric totals."""
    for b in budgets:
        if totals.get(b.window, {}).get(b.metric, 0.0) >= b.limit:
            return budget_reason(b, now)
    return None


def budget_reason(budget: Budget, now: dt.datetime) -> str:
    resets = window_bounds(budget.window, now)[1].strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"budget exhausted: {budget.metric} per {budget.window} ({figure(budget.limit)}); resets {resets}"


def figure(value: float) -> str:
    """A limit or total as a user reads it: `:g`'s six significant digits, but every
    digit of its whole part (`:g` alone: 1,999,999 tokens of 2,000,000 read `2e+06 /
    2e+06`). The whole part by `.0f`, not int(): a total someone wrote as inf is
    shown, not raised on."""
    return f"{value:.{max(6, len(f'{abs(value):.0f}'))}g}"


def error_event(code: str, message: str) -> bytes:
    """The error event a client of an OpenAI-shaped provider gets before the close."""
    return msgspec.json.encode(
        {
            "type": "error",
            "event_id": f"event_conduit_{code}",
            "error": {"type": "invalid_request_error", "code": code, "message": message},
        }
    )


# ElevenLabs Scribe's own message types for the two limits.
_SCRIBE = {"budget_exceeded": "quota_exceeded", "session_limit_reached": "session_time_limit_exceeded"}
# Each dialect's event, as its provider's SDKs parse it, from (close code, name, reason).
_NOTICES: dict[str, Callable[[int, str, str], bytes]] = {
    "openai": lambda close, name, reason: error_event(name, reason),
    # Gemini has no error message; goAway is what it sends before it ends a session.
    "gemini": lambda close, name, reason: b'{"goAway":{"timeLeft":"0s"}}',
    # Deepgram's agent, Flux and Flux TTS; its /v1/listen says `variant`.
    "deepgram": lambda close, name, reason: msgspec.json.encode(
        {"type": "Error", "code": name, "description": reason}
    ),
    "deepgram_listen": lambda close, name, reason: msgspec.json.encode(
        {"type": "Error", "variant": name, "description": reason}
    ),
    "assemblyai": lambda close, name, reason: msgspec.json.encode(
        {"type": "Error", "error_code": close, "error": reason}
    ),
    "scribe": lambda close, name, reason: msgspec.json.encode(
        {"message_type": _SCRIBE[name], "error": reason}
    ),
}


def notice(dialect: str, close: int, name: str, reason: str) -> bytes | None:
    """The event a session ended by a limit gets before its `close` code, in the
    dialect its client reads (providers.dialect); `name` is budget_exceeded or
    session_limit_reached. None: the dialect has none, the close says it alone."""
    build = _NOTICES.get(dialect)
    return build(close, name, reason) if build is not None else None
