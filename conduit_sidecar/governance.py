"""A key's policy over the whole session: budgets, session rate, session cap and
(with a shared store) cluster-wide connection leases.

Admission awaits the store once per new session. Nothing on the per-frame path
does: usage is added to per-key pending totals (metering calls `usage`, audio
seconds come from the relay's C counters on each tick) and flushed every second
and at session end. Enforcement reads the last known window totals plus what is
still pending, so a `response.done` that crosses a budget closes the session at
once, and another pod's usage closes it within a tick.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

from . import _relay
from .keys import KeyEntry
from .policy import (
    METRICS,
    WINDOWS,
    budget_reason,
    cost_usd,
    figure,
    notice,
    over_budget,
    price_for,
    window_bounds,
)
from .state import Batches, KeyDataError, LocalStore, RedisStore, StoreError, Totals, open_store

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics
    from .session import SessionInfo

__all__ = ["Governor"]

log = logging.getLogger("conduit.governance")
TICK_SECONDS = 1.0
_ERROR_CODES: dict[int, str] = {
    _relay.CloseCode.BUDGET_EXHAUSTED: "budget_exceeded",
    _relay.CloseCode.SESSION_TIME_LIMIT: "session_limit_reached",
}
_BINARY = _relay.KIND_NAMES.index("binary")


class _Live:
    """A session's governance state, made only for sessions that need one (a lease,
    a session cap, a budget close): idle sessions are held by the thousand."""

    __slots__ = ("lease", "written", "timer", "closing", "opened")

    def __init__(self):
        self.lease: str | None = None  # the lease member, when one is held
        # False: taken during an outage (or found gone), not in the store yet; None: its
        # admission call is under way, so no renewal touches it.
        self.written: bool | None = True
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.opened: float | None = None  # when the relay started, if its provider bills time open


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Governor:
    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        sessions: Collection[SessionInfo],
        live_per_key: Mapping[str, int],
        model_label: Callable[[str | None], str],
        entry_of: Callable[[str], KeyEntry | None],
    ):
        # What it needs of the process, passed in: it never reaches back into the server.
        self.config = config
        self.state = config.state
        self.metrics = metrics
        self.sessions = sessions  # every live session (the process's own set)
        self.live_per_key = live_per_key
        self.model_label = model_label
        self.entry_of = entry_of  # a key id's entry in the current key file
        self.store = open_store(self.state)
        self.local = self.store if isinstance(self.store, LocalStore) else LocalStore()
        self.pod = secrets.token_hex(6)
        self.available = True
        self.retry_at = 0.0
        self.faulty: set[str] = set()  # keys whose data in the store is not ours, as last seen
        self.pending: dict[str, dict[str, float]] = {}
        # Usage on its way to the store, one batch (number, deltas) per key at a time,
        # and batches whose call failed: the store may have applied one whose answer was
        # late, so it is sent again as it is, before any newer one, and the store applies
        # each number once. Still counted until the store has it, or a session admitted
        # meanwhile would see the key's usage dip.
        self.flushing: dict[str, tuple[int, dict[str, float]]] = {}
        self.unsent: dict[str, tuple[int, dict[str, float]]] = {}
        self.batches = itertools.count(1)
        self.known: dict[str, dict[str, tuple[str, dict[str, float]]]] = {}
        self.live: dict[SessionInfo, _Live] = {}  # the sessions that have one
        self.unreleased: list[tuple[float, str, str]] = []  # (failed at, key id, lease member)
        self.task: asyncio.Task | None = None
        self.background: set[asyncio.Task] = set()
        self.metrics.state_available.set(1)

    @property
    def shared(self) -> bool:
        """Whether max_connections is counted cluster-wide (leases) instead of here."""
        return self.store.shared

    # -- admission -----------------------------------------------------------------

    async def admit(self, info: SessionInfo) -> tuple[int, str] | None:
        """None to go on, or (close code, reason). The caller has reserved `info`."""
        entry = info.key
        if not (entry.budgets or entry.sessions_per_minute or (self.shared and entry.max_connections)):
            return None
        live = self._live(info)
        now = _utcnow()
        try:
            return await self._admit_shared(info, entry, live, now)
        except StoreError as exc:
            if isinstance(exc, KeyDataError):  # the store is up: only this key's data is bad
                self._key_fault(entry.id, exc)
            if self.state.on_unavailable == "closed":
                self.metrics.state_fallbacks.inc("refused")
                return _relay.CloseCode.AT_CAPACITY, "shared state unavailable: try again later"
            self.metrics.state_fallbacks.inc("local")
            refusal = self._admit_local(entry, now)
            if refusal is None and live.lease is not None:
                # Written by the first renewal once the store is back: until the session
                # ends other pods count it under max_connections.
                live.written = False
            return refusal

    async def _admit_shared(
        self, info: SessionInfo, entry: KeyEntry, live: _Live, now: dt.datetime
    ) -> tuple[int, str] | None:
        """One store call: budgets (less what this pod has not flushed yet), then a
        lease and a session-rate slot."""
        pending = self.unflushed(entry.id)
        headroom = [(b.window, b.metric, b.limit - pending.get(b.metric, 0.0)) for b in entry.budgets]
        member = f"{self.pod}:{info.id}"  # unique across pods
        lease = entry.max_connections if self.shared else None
        # Before the call: a session cancelled during it (its client left), or whose
        # call failed after the store ran it, releases a lease the store may have taken
        # (removing one it did not take is harmless).
        live.lease = member if lease else None
        live.written = None
        refusal, totals = await self._op(
            "admit", self.store.admit(entry.id, member, lease, entry.sessions_per_minute, headroom, now)
        )
        live.written = True
        self.faulty.discard(entry.id)
        self._remember(entry.id, totals, now)
        if refusal is None:
            return None
        live.lease = None
        kind, detail = refusal
        if kind == "budget":
            return _relay.CloseCode.BUDGET_EXHAUSTED, budget_reason(entry.budgets[int(detail)], now)
        if kind == "connections":
            return _relay.CloseCode.KEY_LIMIT, _connections_reason(entry)
        return _relay.CloseCode.KEY_LIMIT, _rate_reason(entry, detail)

    def _admit_local(self, entry: KeyEntry, now: dt.datetime) -> tuple[int, str] | None:
        """The shared store is down and on_unavailable = "open": this pod's counts."""
        reason = over_budget(entry.budgets, self.estimate(entry.id, now), now)
        if reason:
            return _relay.CloseCode.BUDGET_EXHAUSTED, reason
        if self.shared and entry.max_connections and self.live_per_key[entry.id] > entry.max_connections:
            return _relay.CloseCode.KEY_LIMIT, _connections_reason(entry)
        if entry.sessions_per_minute:
            wait = self.local.take_start(entry.id, entry.sessions_per_minute)
            if wait:
                return _relay.CloseCode.KEY_LIMIT, _rate_reason(entry, wait)
        return None

    def _live(self, info: SessionInfo) -> _Live:
        live = self.live.get(info)
        if live is None:
            live = self.live[info] = _Live()
        return live

    def started(self, info: SessionInfo) -> None:
        """The relay runs: arm the session cap; the provider's session has begun."""
        if cap := info.key.max_session_seconds:
            self._cap(info, cap)
        if info.metered is not None and info.metered.open_time:
            self._live(info).opened = time.monotonic()

    def recapped(self, info: SessionInfo) -> None:
        """The key file changed a live session's max_session_seconds."""
        live = self.live.get(info)
        if live is not None and live.timer is not None:
            live.timer.cancel()
            live.timer = None
        if cap := info.key.max_session_seconds:
            self._cap(info, cap)

    def _cap(self, info: SessionInfo, cap: float) -> None:
        """The cap counts from the session's start (its handshake), the first one as a
        recapped one: a session already past it ends at once."""
        self._live(info).timer = asyncio.get_running_loop().call_later(
            max(0.0, cap - (time.monotonic() - info.started)),
            self._close,
            info,
            _relay.CloseCode.SESSION_TIME_LIMIT,
            f"session cap of {figure(cap)} s reached",
        )

    def release(self, info: SessionInfo) -> None:
        """The session is over (or never started): count its last audio, free its lease."""
        self._count_audio(info)
        self._count_open_time(info)
        live = self.live.pop(info, None)
        if live is not None:
            if live.timer is not None:
                live.timer.cancel()
            if live.lease is not None:
                self._spawn(self._release_lease(info.key_id, live.lease))
        if info.key_id in self.pending:
            self._spawn(self.flush())

    async def _release_lease(self, key_id: str, member: str) -> None:
        assert isinstance(self.store, RedisStore)  # leases are taken in a shared store only
        try:
            await self._op("release", self.store.release({key_id: [member]}))
        except StoreError:
            self.unreleased.append((time.monotonic(), key_id, member))

    async def _release_again(self) -> None:
        """Leases whose release failed are released once the store answers: other pods
        would count them under max_connections until they expire (lease_seconds after
        their last renewal at most: those are dropped)."""
        since = time.monotonic() - self.state.lease_seconds
        failed, self.unreleased = [r for r in self.unreleased if r[0] > since], []
        if not failed:
            return
        leases: dict[str, list[str]] = {}
        for _, key_id, member in failed:
            leases.setdefault(key_id, []).append(member)
        assert isinstance(self.store, RedisStore)
        try:
            await self._op("release", self.store.release(leases))
        except StoreError:
            self.unreleased += failed

    def _spawn(self, coro) -> asyncio.Task:
        """A store call that `stop` waits for: usage and lease releases are not lost."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    # -- usage and enforcement -------------------------------------------------------

    def usage(self, info: SessionInfo, counts: dict[str, float], model_label: str, model: str | None) -> None:
        """Tokens of one provider usage report (metering), billed at `model`; never awaits."""
        price = price_for(self.config.prices, model)
        seconds = self._reported_seconds(info) if counts.get("audio") else 0.0
        usd = cost_usd(price, counts, seconds) if price is not None else 0.0
        if usd:
            self.metrics.cost.add(usd, info.key_id, info.provider, model_label)
        tokens = counts.get("input", 0) + counts.get("output", 0)  # seconds-only reports have none
        self._add(info.key_id, {"tokens": tokens, "audio_seconds": seconds, "usd": usd})
        self.enforce(info.key_id, _utcnow())

    def _reported_seconds(self, info: SessionInfo) -> float:
        """Audio seconds a provider reported (OpenAI's duration usage, Deepgram's and
        AssemblyAI's at a stream's end) are its word for the session's audio. What the
        binary frames gave at [audio]'s format (nothing for OpenAI, whose audio travels
        as JSON; too little for a Deepgram session in 8 kHz mu-law) is topped up to the
        reports' sum, never cut back. Returns the seconds to charge now."""
        usage = info.usage
        assert usage is not None  # the caller has added the report to it
        self._count_audio(info)
        charged = info.audio_bytes / self.rate(info) + usage.topped_up
        more = max(0.0, usage.seconds["audio"] - charged)
        usage.topped_up += more
        return more

    def rate(self, info: SessionInfo) -> float:
        """Bytes per second of the session's binary audio: its own format where its
        query names one (providers.audio_rate), else [audio]'s."""
        return info.audio_rate or self.config.audio.bytes_per_second

    def _count_audio_all(self) -> None:
        """Not a loop in `run`: its variable would keep the last session alive in that
        coroutine's frame until a tick sees another one."""
        for info in self.sessions:  # (nothing here awaits: the set stays as it is)
            self._count_audio(info)

    def _count_audio(self, info: SessionInfo) -> None:
        relay = info.relay
        if relay is None:
            return
        sent = relay.counters(0)[1][_BINARY]
        if sent == info.audio_bytes:
            return
        seconds = (sent - info.audio_bytes) / self.rate(info)
        info.audio_bytes = sent
        self._charge_seconds(info, seconds)

    def _count_open_time(self, info: SessionInfo) -> None:
        """A relayed session of a provider that bills its time open (Meter.open_time)
        and ended without reporting it (AssemblyAI's SDK disconnects without asking for
        the report by default) is topped up to its time since its relay started: the
        provider's session begins at its handshake's answer, not at the admission (the
        upstream connect is not billed)."""
        live, usage = self.live.get(info), info.usage
        if info.relay is None or live is None or live.opened is None:
            return
        if usage is not None and usage.seconds["audio"]:
            return  # reported: _reported_seconds topped it up
        charged = info.audio_bytes / self.rate(info) + (usage.topped_up if usage else 0.0)
        more = time.monotonic() - live.opened - charged
        if more > 0:
            self._charge_seconds(info, more)

    def _charge_seconds(self, info: SessionInfo, seconds: float) -> None:
        price = price_for(self.config.prices, info.model)
        usd = cost_usd(price, {}, seconds) if price is not None else 0.0
        if usd:
            self.metrics.cost.add(usd, info.key_id, info.provider, self.model_label(info.model))
        self._add(info.key_id, {"audio_seconds": seconds, "usd": usd})

    def _add(self, key_id: str, deltas: dict[str, float]) -> None:
        pending = self.pending.setdefault(key_id, dict.fromkeys(METRICS, 0.0))
        for metric, value in deltas.items():
            pending[metric] += value

    def _remember(self, key_id: str, totals: Totals, now: dt.datetime) -> None:
        self.known[key_id] = {w: (window_bounds(w, now)[0], totals[w]) for w in WINDOWS}

    def unflushed(self, key_id: str) -> dict[str, float]:
        """What this pod counted for the key that the store does not hold yet."""
        held = [self.pending.get(key_id, {})]
        held += [batch[1] for batch in (self.flushing.get(key_id), self.unsent.get(key_id)) if batch]
        return {m: sum(d.get(m, 0.0) for d in held) for m in METRICS}

    def estimate(self, key_id: str, now: dt.datetime) -> Totals:
        """Last known window totals plus what this pod has not flushed yet."""
        known = self.known.get(key_id, {})
        pending = self.unflushed(key_id)
        totals = {}
        for window in WINDOWS:
            stamp, held = known.get(window, ("", {}))
            current = held if stamp == window_bounds(window, now)[0] else {}
            totals[window] = {m: current.get(m, 0.0) + pending.get(m, 0.0) for m in METRICS}
        return totals

    def enforce(self, key_id: str, now: dt.datetime) -> None:
        """Close the key's sessions if it reached a budget of its current entry (the
        one the key rechecks give its sessions). The sessions are walked only then:
        each usage report comes here, and a pod holds sessions by the thousand."""
        entry = self.entry_of(key_id)
        if entry is None or not entry.budgets:
            return
        reason = over_budget(entry.budgets, self.estimate(key_id, now), now)
        if reason:
            for info in [i for i in self.sessions if i.key_id == key_id]:
                self._close(info, _relay.CloseCode.BUDGET_EXHAUSTED, reason)

    def _close(self, info: SessionInfo, code: int, reason: str) -> None:
        relay = info.relay
        if relay is None or relay.finished or info not in self.sessions:
            return
        live = self._live(info)
        if live.closing:
            return
        live.closing = True
        log.info(
            "session limit reached",
            extra={
                "event": "limit",
                "session_id": info.id,
                "key_id": info.key_id,
                "code": code,
                "reason": reason,
            },
        )
        told = notice(info.dialect, code, _ERROR_CODES[code], reason)
        relay.close(code, reason, _relay.CloseCode.NORMAL, "", client_notice=told)

    # -- the store -------------------------------------------------------------------

    async def _op(self, op: str, call):
        """One store call, timed and counted. While the store is known to be down,
        calls fail at once until the next retry (at most one a second)."""
        if not self.available:
            if time.monotonic() < self.retry_at:
                call.close()
                raise StoreError("unavailable")
            # This call is the retry: the others fail at once while it waits, rather
            # than each open a connection to a Redis that may still not answer.
            self.retry_at = time.monotonic() + TICK_SECONDS
        started = time.monotonic()
        try:
            result = await call
        except KeyDataError:  # the store answered: it concerns one key (_key_fault)
            self.metrics.state_operations.inc(op, "error")
            self._answered()
            raise
        except StoreError as exc:
            self.metrics.state_operations.inc(op, "error")
            self.retry_at = time.monotonic() + TICK_SECONDS
            if self.available:
                self.available = False
                self.metrics.state_available.set(0)
                log.warning(
                    "shared state unavailable",
                    extra={
                        "event": "state_unavailable",
                        "error": str(exc),
                        "on_unavailable": self.state.on_unavailable,
                    },
                )
            raise
        self.metrics.state_operations.inc(op, "ok")
        self.metrics.state_seconds.observe(time.monotonic() - started, op)
        self._answered()
        return result

    def _answered(self) -> None:
        if not self.available:
            self.available = True
            self.metrics.state_available.set(1)
            log.info("shared state available again", extra={"event": "state_available"})

    def _key_fault(self, key_id: str, exc: KeyDataError) -> None:
        """Logged once until the key's data is read fine again: its admissions get the
        on_unavailable answer meanwhile, its usage waits in `unsent`."""
        if key_id not in self.faulty:
            self.faulty.add(key_id)
            log.warning(
                "a key's data in the shared state is not the sidecar's",
                extra={
                    "event": "state_key_error",
                    "key_id": key_id,
                    "error": str(exc),
                    "on_unavailable": self.state.on_unavailable,
                },
            )

    async def flush(self) -> None:
        """Add pending usage to the store and refresh the totals of keys in use: one
        round trip for them all, two when a key has a batch to send again (it goes
        first, alone: were the newer one added and it not, it would be skipped)."""
        now = _utcnow()
        keys = set(self.pending) | set(self.unsent) | {i.key_id for i in self.sessions if i.key.budgets}
        again = {k: self.unsent.pop(k) for k in keys if k in self.unsent and k not in self.flushing}
        try:
            if again:
                await self._send(again, now)
            # Not a key in flight: a session's end, while the tick's flush waits (or the reverse).
            # Nor one whose batch failed meanwhile: a newer batch applied first would make
            # the store skip it (its usage pending goes with the next flush, after it).
            batches = {
                key_id: (next(self.batches), {m: v for m, v in self.pending.pop(key_id, {}).items() if v})
                for key_id in keys
                if key_id not in self.flushing and key_id not in self.unsent
            }
            totals = await self._send(batches, now)
        except StoreError:
            return
        for key_id, held in totals.items():
            self._remember(key_id, held, now)
            self.enforce(key_id, now)

    async def _send(self, batches: Batches, now: dt.datetime) -> dict[str, Totals]:
        if not batches:
            return {}
        self.flushing.update(batches)
        try:
            answers = await self._op("add_usage", self.store.add_usage(batches, now, self.pod))
            totals = {}
            for key_id, held in answers.items():
                if isinstance(held, KeyDataError):
                    self._key_fault(key_id, held)
                    if batches[key_id][1]:
                        self.unsent[key_id] = batches[key_id]  # maybe applied: sent again as it is
                else:
                    self.faulty.discard(key_id)
                    totals[key_id] = held
            return totals
        except StoreError:
            for key_id, batch in batches.items():
                if batch[1]:
                    self.unsent[key_id] = batch  # kept for when the store is back
            raise
        finally:
            for key_id in batches:
                del self.flushing[key_id]

    async def _renew(self) -> None:
        if self.shared:
            # Sessions admitted while their key had no max_connections (the key file
            # added it since): leased from now on, so new sessions count them.
            for info in self.sessions:
                if info.key.max_connections and info.relay is not None:
                    live = self._live(info)
                    if live.lease is None:
                        live.lease, live.written = f"{self.pod}:{info.id}", False
        lost = await self._renew_pass()
        if lost:
            # Lost with the store's data (or expired while it was down) while their
            # sessions live on: written again at once, or other pods would admit past
            # max_connections until the next renewal (a session released meanwhile is
            # no longer here). If this fails too, the next renewal writes them.
            await self._renew_pass()
            log.warning("leases lost in the shared state", extra={"event": "leases_lost", "count": lost})

    async def _renew_pass(self) -> int:
        """Extend the leases in the store, write those not written yet; returns how many
        it found gone, marked to be written."""
        leases: dict[str, tuple[list[str], list[str]]] = {}
        unwritten = []
        for info, live in self.live.items():
            if live.lease is not None and live.written is not None:
                leases.setdefault(info.key_id, ([], []))[0 if live.written else 1].append(live.lease)
                if not live.written:
                    unwritten.append(live)
        if not leases:
            return 0
        assert isinstance(self.store, RedisStore)  # leases are taken in a shared store only
        try:
            missing = set(await self._op("renew", self.store.renew(leases)))
        except StoreError:
            return 0
        for live in unwritten:
            live.written = True
        lost = [live for live in self.live.values() if live.lease in missing and live.written]
        for live in lost:
            live.written = False
        return len(lost)

    async def run(self) -> None:
        renew_every = self.state.lease_seconds / 3
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self._count_audio_all()
                # Shielded: a stop during the call waits for it rather than lose its usage.
                await asyncio.shield(self._spawn(self.flush()))
                if self.unreleased:
                    await asyncio.shield(self._spawn(self._release_again()))
                if time.monotonic() - renewed >= renew_every:
                    renewed = time.monotonic()
                    await self._renew()
                if not self.available and time.monotonic() >= self.retry_at + TICK_SECONDS:
                    await self._probe()
            except Exception:  # a bug of ours: leases, budgets and audio need the next tick
                log.exception("governance tick failed", extra={"event": "internal_error"})

    async def _probe(self) -> None:
        """Ask the store that is down, when nothing else has for a tick: with no session
        that needs it, conduit_state_available stayed 0 long after the outage ended."""
        assert isinstance(self.store, RedisStore)  # only a shared store is ever unavailable
        try:
            await self._op("ping", self.store.ping())
        except StoreError:
            pass

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        """The flushes and lease releases under way finish (each within the store's
        timeout), then the last usage is flushed, then the store is closed; usage it
        could not take is logged."""
        if self.task is not None:
            self.task.cancel()
        while self.background:
            await asyncio.gather(*self.background, return_exceptions=True)
        for info in list(self.sessions):
            self._count_audio(info)
        # The store is tried even within a second of a failed try: this usage has no later flush.
        self.retry_at = 0.0
        await self.flush()
        await self._release_again()
        lost = {k: u for k in set(self.pending) | set(self.unsent) if any((u := self.unflushed(k)).values())}
        if lost:
            # Only this line keeps it: an operator can add it to the store by hand.
            log.warning("usage not flushed", extra={"event": "usage_unflushed", "usage": lost})
        await self.store.close()


def _connections_reason(entry: KeyEntry) -> str:
    return f"key limit of {entry.max_connections} concurrent connections reached"


def _rate_reason(entry: KeyEntry, wait: float) -> str:
    return (
        f"key limit of {entry.sessions_per_minute} new sessions per minute reached: "
        f"retry in {math.ceil(wait)} s"
    )
