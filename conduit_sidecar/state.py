"""Counts that must hold across pods: connection leases, session-rate windows and
budget windows. `LocalStore` keeps them in this process; `RedisStore` in Redis,
each update one atomic Lua script, so two pods never both take the last slot (a flush or
renewal of many keys sends their scripts in one round trip).

Redis keys (the key id in braces keeps one key's data in one hash slot; the client
is not cluster-aware: one Redis server):

    PREFIX{KEY_ID}:leases              sorted set, member per live session, score =
                                       lease expiry (ms); TTL lease_seconds, renewed
    PREFIX{KEY_ID}:starts              sorted set of session starts in the last 60 s;
                                       TTL 60 s
    PREFIX{KEY_ID}:usage:WINDOW:STAMP  hash tokens / audio_seconds / usd for one UTC
                                       hour (STAMP YYYYMMDDHH), day (YYYYMMDD) or month
                                       (YYYYMM); expires one hour after the window ends
    PREFIX{KEY_ID}:flushed:POD         the number of the last usage batch of that
                                       sidecar process applied; TTL one day
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import re
import time
from collections.abc import Mapping, Sequence

from .config import ConfigError, State
from .policy import METRICS, WINDOWS, window_bounds

__all__ = [
    "Admission",
    "Batches",
    "KeyDataError",
    "LocalStore",
    "RedisStore",
    "StoreError",
    "Totals",
    "open_store",
]

# window -> metric -> total in the window that holds "now"
Totals = dict[str, dict[str, float]]
# None (admitted), ("budget", index in headroom), ("connections", 0), ("rate", seconds)
Admission = tuple[str, float] | None
# key id -> (batch number, usage deltas): one flush
Batches = Mapping[str, tuple[int, dict[str, float]]]
RATE_WINDOW_SECONDS = 60
_USAGE_GRACE_SECONDS = 3600
# A batch sent again later than this after a late answer would count twice.
_FLUSHED_SECONDS = 86400
# Error replies about one key's data (another program wrote over it: another type, a
# value our scripts cannot count with), not about the store: redis-py's text, its "ERR "
# dropped. Any other error reply (LOADING, READONLY, OOM, MOVED, BUSY...) is the store's.
_KEY_DATA = re.compile(
    r"WRONGTYPE |hash value is not a float|value is not a valid float"
    r"|user_script:\d+: attempt to (?:compare|perform arithmetic)"
)


class StoreError(Exception):
    """The shared store could not be reached or answered an error."""


class KeyDataError(StoreError):
    """One key's data in the store is not what the sidecar wrote there (another
    program wrote over it): that key's calls fail; the store itself answers."""


class LocalStore:
    """This process only: what `backend = "local"` uses, and the fallback when Redis
    is unavailable. Leases are not kept here: the sidecar's own live count is exact."""

    shared = False

    def __init__(self):
        self.starts: dict[str, collections.deque[float]] = {}
        self.usage: dict[tuple[str, str], tuple[str, dict[str, float]]] = {}

    async def admit(
        self,
        key_id: str,
        member: str,
        max_connections: int | None,
        per_minute: int | None,
        headroom: Sequence[tuple[str, str, float]],
        now: dt.datetime,
    ) -> tuple[Admission, Totals]:
        totals = await self.totals(key_id, now)
        for i, (window, metric, left) in enumerate(headroom):
            if totals[window][metric] >= left:
                return ("budget", i), totals
        if per_minute:
            wait = self.take_start(key_id, per_minute)
            if wait:
                return ("rate", wait), totals
        return None, totals

    def take_start(self, key_id: str, per_minute: int) -> float:
        """Record a session start unless `per_minute` were started in the last 60 s;
        returns 0, or the seconds until the oldest start leaves the window."""
        now = time.monotonic()
        starts = self.starts.setdefault(key_id, collections.deque())
        while starts and starts[0] <= now - RATE_WINDOW_SECONDS:
            starts.popleft()
        if len(starts) >= per_minute:
            return starts[0] + RATE_WINDOW_SECONDS - now
        starts.append(now)
        return 0.0

    async def add_usage(self, batches: Batches, now: dt.datetime, pod: str = "") -> dict[str, Totals]:
        return {key_id: self._add(key_id, deltas, now) for key_id, (_, deltas) in batches.items()}

    def _add(self, key_id: str, deltas: dict[str, float], now: dt.datetime) -> Totals:
        totals = {}
        for window in WINDOWS:
            stamp = window_bounds(window, now)[0]
            held = self.usage.get((key_id, window))
            if held is None or held[0] != stamp:
                held = self.usage[(key_id, window)] = (stamp, dict.fromkeys(METRICS, 0.0))
            for metric, value in deltas.items():
                held[1][metric] += value
            totals[window] = dict(held[1])
        return totals

    async def totals(self, key_id: str, now: dt.datetime) -> Totals:
        return self._add(key_id, {}, now)

    async def close(self) -> None:
        pass


_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
# The usage hashes' totals, our fields only (HGETALL of a hash someone filled read them
# all, beyond timeout_seconds), as one string: METRICS per hash, 0 where unset. One
# value, not one per total: redis-py reads each value of a reply in Python (nine
# nils were 6% of the instructions of a session with Redis state).
_TOTALS = (
    "local function totals(keys) local out = {} for _, key in ipairs(keys) do "
    "for _, v in ipairs(redis.call('HMGET', key, '" + "', '".join(METRICS) + "')) do "
    "out[#out + 1] = v or '0' end end return table.concat(out, ' ') end "
)

# One round trip per new session, all or nothing. KEYS leases, starts, then the usage
# hashes of the hour, day and month; ARGV member, max_connections (0: no lease),
# per_minute (0: no rate), lease_ms, window_ms, then per budget: window number (1-3),
# metric, headroom. -> {refusal (0 none, 1 budget, 2 connections, 3 rate), budget
# number or ms to wait, the totals of the three usage hashes}
_ADMIT = (
    _NOW_MS
    + _TOTALS
    + """
local out = {0, 0, totals({KEYS[3], KEYS[4], KEYS[5]})}
for j = 6, #ARGV, 3 do
  local used = tonumber(redis.call('HGET', KEYS[2 + tonumber(ARGV[j])], ARGV[j + 1]) or '0')
  if used >= tonumber(ARGV[j + 2]) then out[1] = 1 out[2] = (j - 6) / 3 return out end
end
local limit = tonumber(ARGV[2])
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= limit then out[1] = 2 return out end
end
local per_minute = tonumber(ARGV[3])
if per_minute > 0 then
  local window = tonumber(ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  if redis.call('ZCARD', KEYS[2]) >= per_minute then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    out[1] = 3 out[2] = math.max(1, tonumber(oldest[2]) + window - now) return out
  end
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], window)
end
if limit > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return out"""
)

# KEYS[1] leases; ARGV ttl_ms, n, then n members to extend (only those still there: one
# released since the renewal was sent stays released), then members to write (taken
# during an outage, or found gone by a renewal); returns the members not there
_RENEW = (
    _NOW_MS
    + """
local ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local missing = {}
for i = 3, #ARGV do
  if i >= 3 + n or redis.call('ZSCORE', KEYS[1], ARGV[i]) then redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  else missing[#missing + 1] = ARGV[i] end
end
redis.call('PEXPIRE', KEYS[1], ttl)
return missing"""
)

# KEYS usage hashes (one per window), then the pod's last applied batch; ARGV (none to
# read only) expire-at (s) per usage hash, the batch's number and the seconds its record
# lasts, then metric, delta... A number not above the last applied was applied already
# (its answer came too late): it is not added again. Returns the hashes' totals.
_ADD = (
    _TOTALS
    + """
local usage, n = {}, #KEYS - 1
local add = #ARGV > n
if add then
  if tonumber(ARGV[n + 1]) <= tonumber(redis.call('GET', KEYS[n + 1]) or '0') then add = false
  else redis.call('SET', KEYS[n + 1], ARGV[n + 1], 'EX', ARGV[n + 2]) end
end
for i = 1, n do
  if add then
    for j = n + 3, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[i], ARGV[j], ARGV[j + 1]) end
    redis.call('EXPIREAT', KEYS[i], ARGV[i])
  end
  usage[i] = KEYS[i]
end
return totals(usage)"""
)


class RedisStore:
    """Redis through redis-py's asyncio client. Each reply (and each connect) is
    bounded by `timeout_seconds`; a call raises StoreError on any failure: the caller
    decides what an outage means (see Governor)."""

    shared = True

    def __init__(self, state: State):
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        password = None
        if state.password_file:
            try:
                with open(state.password_file, encoding="utf-8-sig") as f:  # a BOM (Notepad's) dropped
                    password = f.read().strip()
            except OSError as exc:
                raise ConfigError(f"{state.password_file}: cannot read: {exc.strerror}") from None
            except UnicodeDecodeError:  # its message quotes a byte of the password
                raise ConfigError(f"{state.password_file}: not UTF-8 text") from None
        # Failures in the client's own words (not their subclasses that carry a reply:
        # AuthenticationError, BusyLoadingError).
        self.worded = (redis.ConnectionError, redis.TimeoutError)
        self.no_script = redis.exceptions.NoScriptError
        self.read_only = redis.exceptions.ReadOnlyError
        self.response_error = redis.exceptions.ResponseError
        # No retries inside the client: a failed call falls back at once, and the
        # next flush (within a second) tries again.
        assert state.url is not None  # config.load requires it for redis
        try:
            # At most pool_size connections: a burst of handshakes waits for one (each
            # call holds it one round trip, see _ask) rather than each opening its own,
            # which from hundreds of pods nears Redis' maxclients.
            pool = redis.asyncio.ConnectionPool.from_url(
                state.url,
                max_connections=state.pool_size,
                password=password,
                socket_timeout=state.timeout_seconds,
                socket_connect_timeout=state.timeout_seconds,
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
            )
        except ValueError:  # redis-py's own checks (its message may quote the URL)
            raise ConfigError("[state] url is not a valid Redis URL - at `$.state.url`") from None
        self.client = redis.asyncio.Redis.from_pool(pool)
        # A call in flight per connection, waited for here: redis-py's
        # BlockingConnectionPool takes a lock, a condition and a timer for every call
        # (5% of the instructions of a session with Redis state). A wait past
        # timeout_seconds fails the call as a slow reply does.
        self.calls = asyncio.Semaphore(state.pool_size)
        self.wait_seconds = state.timeout_seconds
        kwargs = self.client.connection_pool.connection_kwargs
        # Where it is, for messages: never the URL, which can hold a password.
        self.where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        self.prefix = state.key_prefix
        self.lease_ms = int(state.lease_seconds * 1000)
        self.admit_script = self.client.register_script(_ADMIT)
        self.renew_script = self.client.register_script(_RENEW)
        self.add_script = self.client.register_script(_ADD)

    def key(self, key_id: str, suffix: str) -> str:
        return f"{self.prefix}{{{key_id}}}:{suffix}"

    async def _ask(self, call):
        """Await one call of the client: whatever it raises is the store's failure, its
        own errors and any other from inside it (a server on the port that is not Redis,
        an echo, makes its reading of the "replies" raise AttributeError). At most
        pool_size calls are in flight; one more waits timeout_seconds at most."""
        try:
            if self.calls.locked():  # every connection busy: wait for one
                async with asyncio.timeout(self.wait_seconds):
                    await self.calls.acquire()
            else:
                await self.calls.acquire()  # at once, without a timer
        except TimeoutError:
            call.close()
            raise StoreError("No connection available.") from None
        except asyncio.CancelledError:  # the session went while it waited
            call.close()
            raise
        try:
            result = await call
        except Exception as exc:
            raise await self._error(exc) from None
        finally:
            self.calls.release()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # redis-py loses a cancellation that comes with the reply (the call returns):
            # the caller, a session whose client left, must still see it.
            raise asyncio.CancelledError
        return result

    async def _call(self, script, keys, args):
        return await self._ask(script(keys=keys, args=args))

    async def _error(self, exc: Exception) -> StoreError:
        """A failed call, as log lines and `usage` word it: a connection's or a timeout's
        own message, else only the kind. A reply's text is the server's, and one that
        does not know a command quotes it (`unknown command 'AUTH', with args beginning
        with: 'default' 'PASSWORD'`), as a reply that is not RESP quotes what came."""
        if isinstance(exc, self.read_only):
            # A failover made the node these connections reach a replica (the URL's
            # name now points to the new primary): new ones look the name up again.
            with contextlib.suppress(Exception):  # as _ask: whatever the client raises
                await self.client.connection_pool.disconnect()
        if isinstance(exc, (OSError, TimeoutError)) or type(exc) in self.worded:
            return StoreError(str(exc) or type(exc).__name__)
        if type(exc) is self.response_error and (kind := _KEY_DATA.match(str(exc))):
            if kind.group().startswith("WRONGTYPE"):
                return KeyDataError("a key's data in Redis is of another type (WRONGTYPE)")
            return KeyDataError("a key's data in Redis is not a number")
        return StoreError(f"{type(exc).__name__} (the reply's text not shown)")

    async def _call_each(self, script, calls: list[tuple[list[str], list]]) -> list:
        """`script` once per (keys, args), all in one round trip (a pipeline, not a
        transaction: each call is one script on its key's hash slot). A call failed by
        its key's data has its KeyDataError in place of its reply; any other failed call
        fails them all: each caller's scripts are safe to run again."""
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies = await self._ask(pipe.execute(raise_on_error=False))
            if not any(isinstance(reply, self.no_script) for reply in replies):
                break
            await self._ask(self.client.script_load(script.script))  # Redis restarted: none ran
        return await self._failed_by_key(replies)

    async def _failed_by_key(self, replies: list) -> list:
        """A pipeline's replies, a KeyDataError in place of each error reply about its
        key's data; the StoreError of any other error reply is raised."""
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):
                error = await self._error(reply)
                if not isinstance(error, KeyDataError):
                    raise error
                replies[i] = error
        return replies

    def usage_keys(self, key_id: str, now: dt.datetime) -> tuple[list[str], list[int]]:
        """The usage hashes of the windows that hold `now`, and when each expires."""
        keys, expire_at = [], []
        for window in WINDOWS:
            stamp, end = window_bounds(window, now)
            keys.append(self.key(key_id, f"usage:{window}:{stamp}"))
            expire_at.append(int(end.timestamp()) + _USAGE_GRACE_SECONDS)
        return keys, expire_at

    async def admit(
        self,
        key_id: str,
        member: str,
        max_connections: int | None,
        per_minute: int | None,
        headroom: Sequence[tuple[str, str, float]],
        now: dt.datetime,
    ) -> tuple[Admission, Totals]:
        """Check budgets (refused when a window total reached its headroom), then take
        a lease under max_connections and a session-rate slot: atomically, at once."""
        usage, _ = self.usage_keys(key_id, now)
        args = [member, max_connections or 0, per_minute or 0, self.lease_ms, RATE_WINDOW_SECONDS * 1000]
        for window, metric, left in headroom:
            args += [WINDOWS.index(window) + 1, metric, repr(float(left))]
        refusal, detail, held = await self._call(
            self.admit_script, [self.key(key_id, "leases"), self.key(key_id, "starts"), *usage], args
        )
        totals = _parse(held)
        if refusal == 1:
            return ("budget", detail), totals
        if refusal == 2:
            return ("connections", 0), totals
        if refusal == 3:
            return ("rate", detail / 1000), totals
        return None, totals

    async def renew(self, leases: dict[str, tuple[list[str], list[str]]]) -> list[str]:
        """Per key: (members to extend, members to write). Returns the members to extend
        that were gone (Redis restarted empty, or they expired while it was down):
        extending never brings one back, a released lease included. A key whose leases
        another program wrote over is left out (its admissions say so)."""
        calls = [
            ([self.key(key_id, "leases")], [self.lease_ms, len(extend), *extend, *write])
            for key_id, (extend, write) in leases.items()
        ]
        replies = await self._call_each(self.renew_script, calls)
        return [member for missing in replies if not isinstance(missing, KeyDataError) for member in missing]

    async def release(self, leases: Mapping[str, list[str]]) -> None:
        """Remove leases (members per key), in one round trip. A key whose leases
        another program wrote over holds none of ours: nothing to remove there."""
        pipe = self.client.pipeline(transaction=False)
        for key_id, members in leases.items():
            pipe.zrem(self.key(key_id, "leases"), *members)
        await self._failed_by_key(await self._ask(pipe.execute(raise_on_error=False)))

    async def add_usage(
        self, batches: Batches, now: dt.datetime, pod: str = ""
    ) -> dict[str, Totals | KeyDataError]:
        """Add per key one batch of a sidecar process's usage (`pod`, numbered upwards:
        a batch sent again is added once) and return the keys' window totals, or the
        KeyDataError of a key whose data is not ours (its batch maybe not added)."""
        calls = []
        for key_id, (batch, deltas) in batches.items():
            keys, expire_at = self.usage_keys(key_id, now)
            args: list[int | str] = [*expire_at, batch, _FLUSHED_SECONDS] if deltas else []
            for metric, value in deltas.items():
                args += [metric, repr(float(value))]
            keys.append(self.key(key_id, f"flushed:{pod}"))
            calls.append((keys, args))
        replies = await self._call_each(self.add_script, calls)
        return {key_id: _totals_of(held) for key_id, held in zip(batches, replies, strict=True)}

    async def totals(self, key_id: str, now: dt.datetime) -> Totals:
        held = (await self.add_usage({key_id: (0, {})}, now))[key_id]
        if isinstance(held, KeyDataError):
            raise held
        return held

    async def ping(self) -> None:
        """Whether it answers (StoreError if not)."""
        await self._ask(self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


def _totals_of(held: str | KeyDataError) -> Totals | KeyDataError:
    try:
        return held if isinstance(held, KeyDataError) else _parse(held)
    except KeyDataError as exc:
        return exc


def _parse(held: str) -> Totals:
    """The totals (_TOTALS) of the hour, day and month hashes -> Totals. A value that is
    not a number (the hash written by someone else) is an error of that key's data, as
    a WRONGTYPE reply is: not a bug of ours."""
    try:
        values = [float(value) for value in held.split(" ")]
        # a value with a space in it; "nan", which Python and Lua read, compares below
        # any budget
        if len(values) != len(WINDOWS) * len(METRICS) or any(v != v for v in values):
            raise ValueError
    except ValueError:
        raise KeyDataError("a usage total in Redis is not a number") from None
    each = iter(values)
    return {window: {metric: next(each) for metric in METRICS} for window in WINDOWS}


def open_store(state: State) -> LocalStore | RedisStore:
    return RedisStore(state) if state.backend == "redis" else LocalStore()
