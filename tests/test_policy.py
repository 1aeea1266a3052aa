"""Governance arithmetic and schemas (pure functions): prices, cost to the cent,
UTC windows and reset times, and the key-file and config validation."""

from __future__ import annotations

import datetime as dt
import json
import os
import re

import msgspec
import pytest

from conduit_sidecar import config as config_mod
from conduit_sidecar.config import ConfigError, Price
from conduit_sidecar.keys import Budget, load_keys
from conduit_sidecar.policy import cost_usd, error_event, figure, notice, over_budget, price_for, window_bounds
from conduit_sidecar.providers import dialect, native

UTC = dt.timezone.utc


def test_cost_matches_hand_computation_to_the_cent():
    # gpt-realtime-like prices (USD per million tokens), and a response with cache hits.
    price = Price(input_text=4.0, input_audio=32.0, input_cached=0.4, output_text=16.0,
                  output_audio=64.0)
    tokens = {"input": 21_000, "output": 9_000, "input_text": 6_000, "input_audio": 15_000,
              "input_cached": 2_000, "output_text": 1_000, "output_audio": 8_000}
    # text 4,000 x 4 = 0.016; cached 2,000 x 0.4 = 0.0008; audio in 15,000 x 32 = 0.48;
    # text out 1,000 x 16 = 0.016; audio out 8,000 x 64 = 0.512 -> 1.0248 -> $1.02
    assert round(cost_usd(price, tokens), 2) == 1.02
    assert cost_usd(price, tokens) == pytest.approx(1.0248)


def test_cost_by_audio_minute():
    price = Price(audio_minute=0.0043)               # e.g. a streaming STT price
    # 1 hour 30 minutes = 90 minutes x 0.0043 = 0.387 -> $0.39
    assert round(cost_usd(price, {}, 5400.0), 2) == 0.39


def test_cached_audio_is_billed_at_the_cached_price_not_as_audio():
    """A long voice session's cache hits are mostly audio (OpenAI's
    cached_tokens_details): those tokens were billed at the audio price, about 7x the
    cost here, and usd budgets closed sessions that early."""
    price = Price(input_text=4.0, input_audio=32.0, input_cached=0.4)
    tokens = {"input_text": 500, "input_audio": 20_000, "input_cached": 18_000,
              "input_cached_audio": 17_600}
    # text 100 x 4 = 0.0004; audio 2,400 x 32 = 0.0768; cached 18,000 x 0.4 = 0.0072
    assert cost_usd(price, tokens) == pytest.approx(0.0844)


def test_cached_tokens_never_exceed_text_tokens():
    price = Price(input_text=10.0, input_cached=1.0)
    assert cost_usd(price, {"input_text": 100, "input_cached": 500}) == pytest.approx(100e-6)


def test_price_for_exact_then_longest_prefix():
    prices = {"gpt-realtime*": Price(input_text=1), "gpt-realtime-mini*": Price(input_text=2),
              "gpt-realtime-mini-2025": Price(input_text=3)}
    assert price_for(prices, "gpt-realtime-2025").input_text == 1
    assert price_for(prices, "gpt-realtime-mini-x").input_text == 2
    assert price_for(prices, "gpt-realtime-mini-2025").input_text == 3
    assert price_for(prices, "whisper") is None
    assert price_for(prices, None) is None


@pytest.mark.parametrize("window, stamp, end", [
    ("hour", "2026120123", dt.datetime(2026, 12, 2, 0, tzinfo=UTC)),
    ("day", "20261201", dt.datetime(2026, 12, 2, tzinfo=UTC)),
    ("month", "202612", dt.datetime(2027, 1, 1, tzinfo=UTC)),
])
def test_windows_are_utc_calendar_windows(window, stamp, end):
    # 00:30 in UTC+1 is 23:30 UTC the day before.
    now = dt.datetime(2026, 12, 2, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert window_bounds(window, now) == (stamp, end)


def test_over_budget_names_the_budget_and_its_reset():
    budgets = [Budget("usd", 50, "month"), Budget("tokens", 1000, "day")]
    now = dt.datetime(2026, 2, 10, 12, tzinfo=UTC)
    assert over_budget(budgets, {"day": {"tokens": 999}}, now) is None
    reason = over_budget(budgets, {"day": {"tokens": 1000}, "month": {"usd": 3}}, now)
    assert reason == "budget exhausted: tokens per day (1000); resets 2026-02-11T00:00:00Z"
    reason = over_budget(budgets, {"month": {"usd": 50.2}}, now)
    assert reason == "budget exhausted: usd per month (50); resets 2026-03-01T00:00:00Z"
    assert len(reason.encode()) <= 123      # fits a close frame


def test_a_figure_keeps_every_digit_of_its_whole_part():
    """A limit of 2,000,000 tokens reads as such in a close reason and in `usage`
    (not `2e+06`), and a total one short of it is not rounded up to it."""
    assert figure(1_999_999) == "1999999"
    assert figure(2_000_000) == "2000000"
    assert figure(12.3456789) == "12.3457"          # six significant digits below a million
    reason = over_budget([Budget("tokens", 2_000_000, "day")], {"day": {"tokens": 2_000_000}},
                         dt.datetime(2026, 2, 10, 12, tzinfo=UTC))
    assert reason == "budget exhausted: tokens per day (2000000); resets 2026-02-11T00:00:00Z"


def test_error_event_is_openai_shaped():
    event = json.loads(error_event("budget_exceeded", "over"))
    assert event["type"] == "error"
    assert event["error"] == {"type": "invalid_request_error", "code": "budget_exceeded",
                              "message": "over"}


_GEMINI = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"


@pytest.mark.parametrize("provider,path,expected", [
    ("openai", "/v1/realtime", {"type": "error", "event_id": "event_conduit_NAME",
                                "error": {"type": "invalid_request_error", "code": "NAME",
                                          "message": "REASON"}}),
    ("mine", "/v1/realtime/translations", {"type": "error", "event_id": "event_conduit_NAME",
                                           "error": {"type": "invalid_request_error",
                                                     "code": "NAME", "message": "REASON"}}),
    ("gemini", _GEMINI, {"goAway": {"timeLeft": "0s"}}),
    ("gemini", _GEMINI + "Constrained", {"goAway": {"timeLeft": "0s"}}),
    ("gemini", _GEMINI.replace("Content", "Music"), None),
    ("deepgram", "/v1/listen", {"type": "Error", "variant": "NAME", "description": "REASON"}),
    ("deepgram", "/v2/listen", {"type": "Error", "code": "NAME", "description": "REASON"}),
    ("deepgram", "/v2/speak", {"type": "Error", "code": "NAME", "description": "REASON"}),
    ("deepgram", "/v1/speak", None),
    ("deepgram_agent", "/v1/agent/converse", {"type": "Error", "code": "NAME", "description": "REASON"}),
    ("assemblyai", "/v3/ws", {"type": "Error", "error_code": "CODE", "error": "REASON"}),
    ("elevenlabs", "/v1/speech-to-text/realtime", {"message_type": "SCRIBE", "error": "REASON"}),
    ("elevenlabs", "/v1/convai/conversation", None),
    ("elevenlabs", "/v1/text-to-speech/abc/stream-input", None),
])
@pytest.mark.parametrize("code,name,scribe", [
    (4002, "budget_exceeded", "quota_exceeded"),
    (4008, "session_limit_reached", "session_time_limit_exceeded"),
])
def test_a_limit_is_told_in_the_dialect_of_the_path(provider, path, expected, code, name, scribe):
    """DESIGN.md: one event in the provider's own shape, then the close; none where its
    SDKs know no such event (Deepgram's Speak v1 SDK would read one as a Flushed)."""
    where = native(path)
    got = notice(dialect(provider, where.kept if where else None), code, name, "over")
    if expected is None:
        assert got is None
        return
    text = json.dumps(expected).replace("NAME", name).replace("REASON", "over")
    text = text.replace('"CODE"', str(code)).replace("SCRIBE", scribe)
    assert json.loads(got) == json.loads(text)


def _keyfile(tmp_path, **fields) -> str:
    path = os.path.join(tmp_path, "keys.json")
    with open(path, "w") as f:
        json.dump({"keys": [{"id": "a", "sha256": "0" * 64, **fields}]}, f)
    return path


def test_key_policy_fields_validate(tmp_path):
    keys = load_keys(_keyfile(tmp_path, max_session_seconds=30, sessions_per_minute=5,
                              budgets=[{"metric": "usd", "limit": 2.5, "window": "day"}]))
    entry = keys.by_id["a"]
    assert entry.max_session_seconds == 30 and entry.sessions_per_minute == 5
    assert entry.budgets == [Budget("usd", 2.5, "day")]
    for bad, where in [({"budgets": [{"metric": "euros", "limit": 1, "window": "day"}]}, "metric"),
                       ({"budgets": [{"metric": "usd", "limit": 0, "window": "day"}]}, "limit"),
                       ({"budgets": [{"metric": "usd", "limit": 1, "window": "week"}]}, "window"),
                       ({"max_session_seconds": 0}, "max_session_seconds"),
                       ({"sessions_per_minute": 0}, "sessions_per_minute")]:
        with pytest.raises(ConfigError, match=where):
            load_keys(_keyfile(tmp_path, **bad))
    same = [{"metric": "usd", "limit": 1, "window": "day"}] * 2
    with pytest.raises(ConfigError, match="same metric and window"):
        load_keys(_keyfile(tmp_path, budgets=same))


def test_state_and_prices_config(tmp_path):
    path = os.path.join(tmp_path, "c.toml")
    with open(path, "w") as f:
        f.write('[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:1"\non_unavailable = "closed"\n'
                '[prices."gpt-realtime*"]\ninput_text = 4\noutput_audio = 64\n')
    conf = config_mod.load(path, environ={})
    assert conf.state.on_unavailable == "closed"
    assert conf.prices["gpt-realtime*"] == Price(input_text=4, output_audio=64)
    for body, where in [('[state]\nbackend = "redis"\n', "state.url"),
                        ('[state]\nbackend = "redis"\nurl = "http://x"\n', "state.url"),
                        ('[state]\nbackend = "memcached"\n', "state.backend"),
                        ('[prices.x]\ninput_text = -1\n', ">= 0.0 - at `$.prices.x.input_text"),
                        ('[prices.x]\ninput_euros = 1\n', "input_euros")]:
        with open(path, "w") as f:
            f.write(body)
        with pytest.raises(ConfigError, match=re.escape(where)):
            config_mod.load(path, environ={})
    assert msgspec.convert({}, config_mod.State).backend == "local"


def test_check_config_warns_about_unpriced_models(tmp_path, capsys):
    from conduit_sidecar import cli
    keys = os.path.join(tmp_path, "keys.json")
    with open(keys, "w") as f:
        json.dump({"keys": [
            {"id": "paid", "sha256": "1" * 64, "allowed_models": ["mock-*", "other-*"],
             "budgets": [{"metric": "usd", "limit": 5, "window": "day"}]},
            {"id": "free", "sha256": "2" * 64, "allowed_models": ["free-*"]}]}, f)
    path = os.path.join(tmp_path, "c.toml")
    with open(path, "w") as f:
        f.write(f'keys_file = "{keys}"\n[providers.mock]\nurl = "ws://127.0.0.1:1/"\n'
                '[prices."mock-*"]\ninput_text = 1\n')
    assert cli.main(["check-config", "--config", path]) == 0
    err = capsys.readouterr().err
    assert "key 'paid' has a usd budget but model 'other-*' has no [prices] entry" in err
    assert "mock-*" not in err and "free" not in err


def test_check_config_warns_of_a_prefix_pattern_whose_bare_prefix_alone_is_priced(tmp_path, capsys):
    """A key allowed `mock-realtime*`, a price for `mock-realtime` only: the key's
    sessions on `mock-realtime-2` (a dated model name) cost nothing against its budget.
    The check looked up the pattern without its `*`, found the exact price, and said
    nothing."""
    from conduit_sidecar import cli
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"id": "paid", "sha256": "1" * 64, "allowed_models": ["mock-realtime*", "mock-mini*"],
         "budgets": [{"metric": "usd", "limit": 5, "window": "day"}]}]}))
    path = tmp_path / "c.toml"
    path.write_text(f'keys_file = "{keys}"\n[providers.mock]\nurl = "ws://127.0.0.1:1/"\n'
                    '[prices."mock-realtime"]\ninput_text = 1\n[prices."mock-*"]\ninput_text = 2\n')
    assert cli.main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().err == ""              # mock-* covers both
    path.write_text(f'keys_file = "{keys}"\n[providers.mock]\nurl = "ws://127.0.0.1:1/"\n'
                    '[prices."mock-realtime"]\ninput_text = 1\n[prices."mock-mini*"]\ninput_text = 2\n')
    assert cli.main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().err == (
        "warning: key 'paid' has a usd budget but model 'mock-realtime*' has no [prices] entry\n")
    assert price_for({"mock-realtime": Price(input_text=1)}, "mock-realtime-2") is None
