"""Secrets in text a peer wrote: a close reason that quotes a key ("invalid key sk-...",
a provider echoing what it was sent; a client's close reason holding its virtual key)
goes to the other peer and into the log only with each secret as `***`.

Only close reasons are read, never frames: a few microseconds at a session's end."""

from __future__ import annotations

import re

from .keys import KEY_PREFIX

__all__ = ["redact", "remember"]

# A virtual key's characters (`secrets.token_urlsafe`), however far it goes: cut short it
# is still part of a key.
_VIRTUAL = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_\-]*")
# The shortest run of a provider secret's characters redacted: a close reason holds at
# most 123 bytes, so a longer key is quoted cut (OpenAI's are 164 characters).
_RUN = 8
# Of each source of a provider secret (a file or variable), the secret it holds now and
# the one before (a session begun before a rotation may still be quoted), and every run
# of _RUN characters of their first _INDEXED: bounded by the config's sources, not by how
# often a secret is rotated, nor (a 64 KiB secret file) by its length.
_INDEXED = 4096
_by_source: dict[str, tuple[str, ...]] = {}
_runs: frozenset[str] = frozenset()
# Secrets shorter than _RUN have no run: each is redacted whole, longest first; one
# shorter than _SHORTEST is not (three characters are found in any text, and no
# provider issues such a key).
_SHORTEST = 4
_short: tuple[str, ...] = ()


def remember(source: str, secret: str) -> None:
    """A provider credential the sidecar is about to send, and where it comes from
    (routing.Router.secret, routing.Router's upstream requests)."""
    global _runs, _short
    kept = _by_source.get(source, ())
    if kept[:1] == (secret,):
        return
    _by_source[source] = (secret, *kept[:1])
    secrets = {s for kept in _by_source.values() for s in kept}
    _runs = frozenset(s[i : i + _RUN] for s in secrets for i in range(min(len(s), _INDEXED) - _RUN + 1))
    _short = tuple(sorted((s for s in secrets if _SHORTEST <= len(s) < _RUN), key=len, reverse=True))


def redact(text: str) -> str:
    """`text` with each virtual key, each run of 8 or more characters found in a
    provider secret, and each secret of 4 to 7 characters, as `***`; `text` itself
    when it holds none."""
    if KEY_PREFIX in text:
        text = _VIRTUAL.sub("***", text)
    for secret in _short:
        text = text.replace(secret, "***")
    runs = _runs
    starts = [i for i in range(len(text) - _RUN + 1) if text[i : i + _RUN] in runs]
    if not starts:
        return text
    parts: list[str] = []
    kept = 0  # where the text after the last `***` begins
    for start in starts:
        if start > kept or not parts:  # (else it overlaps or adjoins the last run: one `***`)
            parts += (text[kept:start], "***")
        kept = start + _RUN
    parts.append(text[kept:])
    return "".join(parts)
