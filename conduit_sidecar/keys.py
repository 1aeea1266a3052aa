"""Virtual keys: the key file schema, the loaded key set and its reload watcher.

The key file holds SHA-256 hashes only. A presented key is hashed and looked up;
plaintext keys are never compared, stored, logged or forwarded.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import Annotated, Literal

import msgspec

from .config import ConfigError
from .watch import FileWatch, file_signature, read_regular

__all__ = [
    "KEY_PREFIX",
    "Budget",
    "KeyEntry",
    "KeyFile",
    "KeySet",
    "KeyWatcher",
    "Rejection",
    "hash_key",
    "load_keys",
    "new_key",
]

KEY_PREFIX = "condt_"
# Far above a Kubernetes Secret's 1 MiB (some 100,000 keys): a file mounted by mistake
# (a device, a log) must not stall the event loop or fill the memory of a running sidecar.
MAX_KEY_FILE_BYTES = 16 << 20
log = logging.getLogger("conduit.keys")

Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]  # \Z: $ matches before a final newline
KeyId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+\Z")]
AgentId = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+\Z")]


class Rejection(enum.Enum):
    """Why a key is refused (close 4001): the value is the close reason, the name in
    lower case the `conduit_auth_failures_total{reason}` label."""

    MISSING = "missing key"
    TWO_KEYS = "two different keys"  # where one is read (two Authorization headers): neither is taken
    UNKNOWN = "unknown key"
    DISABLED = "key disabled"
    EXPIRED = "key expired"
    REVOKED = "key revoked"
    SIGNATURE = "unknown or expired signed URL"

    @property
    def label(self) -> str:
        return self.name.lower()


class Budget(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A limit on a key's usage per UTC calendar window (tokens are input + output)."""

    metric: Literal["tokens", "audio_seconds", "usd"]
    limit: Annotated[float, msgspec.Meta(gt=0)]
    window: Literal["hour", "day", "month"]


class KeyEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    id: KeyId
    sha256: Sha256
    enabled: bool = True
    expires_at: Annotated[dt.datetime, msgspec.Meta(tz=True)] | None = None  # with its zone (Z)
    allowed_models: list[str] | None = None  # None: any model
    allowed_providers: list[str] | None = None  # None: any provider
    max_connections: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_session_seconds: Annotated[float, msgspec.Meta(gt=0)] | None = None
    sessions_per_minute: Annotated[int, msgspec.Meta(ge=1)] | None = None
    budgets: list[Budget] = []
    # ElevenLabs public agents whose key-less sessions (the SDK's requires_auth=False)
    # are this key's: its policy, limits and budgets apply; one key per agent.
    public_agents: list[AgentId] = []

    def allows_model(self, model: str) -> bool:
        return self.allowed_models is None or any(match(p, model) for p in self.allowed_models)

    def allows_provider(self, provider: str) -> bool:
        return self.allowed_providers is None or provider in self.allowed_providers

    def expired(self, now: dt.datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class KeyFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[KeyEntry]


def match(pattern: str, value: str) -> bool:
    """Exact match, or prefix match when the pattern ends with `*`."""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 256 bits


class KeySet:
    """An immutable loaded key file: hash -> entry. `signature`: the file's as it was
    before the read (watch.file_signature), None for a set made in memory."""

    def __init__(self, entries: list[KeyEntry], signature: tuple | None = None):
        self.signature = signature
        self.by_hash = {e.sha256: e for e in entries}
        self.by_id = {e.id: e for e in entries}
        self.by_agent = {agent: e for e in entries for agent in e.public_agents}  # load_keys: one key each

    def __len__(self) -> int:
        return len(self.by_hash)

    def lookup(self, key: str) -> KeyEntry | None:
        return self.by_hash.get(hash_key(key))

    def recheck(
        self, entry: KeyEntry, now: dt.datetime, agent: str | None = None
    ) -> tuple[KeyEntry | None, Rejection | None]:
        """A live session's key against this set: its current entry, found by hash (a
        rotation under the same id revokes the old key), and the 4001 reason if the
        session must end. `agent`: the session was admitted as this public agent's,
        which the key must still list. A new id revokes too: the session's counts,
        leases and budgets are its admission id's, which the file no longer has."""
        current = self.by_hash.get(entry.sha256)
        if (
            current is None
            or current.id != entry.id
            or (agent is not None and agent not in current.public_agents)
        ):
            return current, Rejection.REVOKED
        if not current.enabled:
            return current, Rejection.DISABLED
        if current.expired(now):
            return current, Rejection.EXPIRED
        return current, None


def _unescaped(data: bytes) -> bytes:
    """The JSON with its escapes undone (`condt\\u005f...` is a key too: an id that
    would be logged and labelled, a value or member name msgspec's errors quote); empty
    if it is not JSON (its decode error, below, quotes nothing)."""
    try:
        return msgspec.json.encode(msgspec.json.decode(data))
    except (msgspec.DecodeError, RecursionError):
        return b""


def load_keys(path: str) -> KeySet:
    """Read and validate a key file; raises ConfigError naming the problem."""
    signature = file_signature(path)  # before the read: a change during it is seen later
    try:
        data = read_regular(path, MAX_KEY_FILE_BYTES)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    # Only a \u escape can spell the prefix's letters: most files are decoded once.
    if KEY_PREFIX.encode() in data or (b"\\u" in data and KEY_PREFIX.encode() in _unescaped(data)):
        raise ConfigError(
            f"{path}: holds a plaintext key ({KEY_PREFIX}...): store only its "
            "sha256 (conduit-sidecar keys hash, the key on its standard input)"
        )
    try:
        keyfile = msgspec.json.decode(data, type=KeyFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    seen_ids: set[str] = set()
    seen_hashes: set[str] = set()
    agents: dict[str, str] = {}  # public agent -> the key listing it
    for i, entry in enumerate(keyfile.keys):
        if entry.id in seen_ids:
            raise ConfigError(f"{path}: duplicate key id {entry.id!r} - at `$.keys[{i}].id`")
        if entry.sha256 in seen_hashes:
            raise ConfigError(f"{path}: duplicate sha256 - at `$.keys[{i}].sha256`")
        windows = [(b.metric, b.window) for b in entry.budgets]
        if len(set(windows)) != len(windows):
            raise ConfigError(
                f"{path}: two budgets with the same metric and window - at `$.keys[{i}].budgets`"
            )
        for agent in entry.public_agents:
            if agent in agents:
                raise ConfigError(
                    f"{path}: public agent {agent!r} is listed by key {agents[agent]!r} and key "
                    f"{entry.id!r}: a public agent belongs to one key - at `$.keys[{i}].public_agents`"
                )
            agents[agent] = entry.id
        seen_ids.add(entry.id)
        seen_hashes.add(entry.sha256)
    return KeySet(keyfile.keys, signature)


class KeyWatcher:
    """Checks the key file (the server polls) and swaps in a new valid set, keeping
    the last good one.
    `on_change(keyset)` gets the new set, or None when the new file is invalid."""

    def __init__(self, path: str, keyset: KeySet, on_change: Callable[[KeySet | None], None]):
        self.path = path
        self.keyset = keyset
        self.on_change = on_change
        self.file = FileWatch(path)
        if keyset.signature is not None:
            # From the file as it was read, not as it is now: one replaced while the
            # process started (a Secret update) is reloaded at the first check.
            self.file.signature = (keyset.signature,)

    def check(self) -> None:
        if not self.file.changed():
            return
        try:
            new = load_keys(self.path)
        except ConfigError as exc:
            log.warning(
                "key reload failed; keeping the last good key set",
                extra={
                    "event": "keys_reload",
                    "result": "invalid",
                    "error": str(exc),
                    "keys": len(self.keyset),
                },
            )
            self.file.after_failure(True)
            self.on_change(None)
            return
        self.file.after_failure(False, (new.signature,))
        self.keyset = new
        log.info("keys reloaded", extra={"event": "keys_reload", "result": "ok", "keys": len(new)})
        self.on_change(new)
