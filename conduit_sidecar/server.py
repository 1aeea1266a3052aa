"""The sidecar process: listeners, live sessions, limits, key reloads, drain."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import functools
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence

from . import __version__, _relay, held, ktls, logs, redact
from .admin import AdminServer
from .config import Config, split_hostport
from .governance import Governor
from .handshake import Admission, Close
from .keys import KeyEntry, KeySet, KeyWatcher, Rejection
from .metering import MODEL_LABELS_MAX, SECONDS_KINDS, MalformedUsage, Transcription, Usage
from .metrics import Metrics
from .routing import Router
from .session import ClientHandshake, SessionInfo, Slots, bound_kernel_buffers, linger, unkeyed
from .signed_urls import SignedUrls
from .tls import ListenerTLS
from .tlsleg import TLSStream
from .trim import Trimmer
from .upstream import Balancer, Failed, Health

__all__ = ["Sidecar"]

log = logging.getLogger("conduit.server")
_BINARY = _relay.KIND_NAMES.index("binary")
_CLOSE = _relay.KIND_NAMES.index("close")
_NO_USAGE = Usage()  # read only: the session_end line of a session no provider billed
# A provider that ends a session this soon after its relay started, with one of these
# codes, before any client frame reached it, failed as a refused connect does (judge).
# 1007: the only data it had was our request (Gemini's refusal of the API key). Not
# 1008: a policy refusal may be of what the client asked (a model in the URL), as a 403.
_EARLY_SECONDS = 1.0
_EARLY_CODES = frozenset(
    (_relay.CloseCode.INTERNAL_ERROR, _relay.CloseCode.CONNECTION_LOST, _relay.CloseCode.INVALID_DATA)
)
# The relay's verdicts on a provider's frames that say it broke the protocol (1009 is
# our limit's); the relay then closed the session itself.
_BROKEN = frozenset((_relay.CloseCode.PROTOCOL_ERROR, _relay.CloseCode.INVALID_DATA))


def _close_label(side: str, code: int) -> str:
    """A client picks its close code: the 2,000 of the application range (3000-4999)
    are two label values, not a series each (the session_end line keeps the code)."""
    return f"{code // 1000}xxx" if side == "client" and code >= 3000 else str(code)


def _ended_by_provider(relay) -> str | None:
    """Why the provider ended the session, if it did with one of _EARLY_CODES, or by a
    frame the relay refused (its close reason names the violator); else None."""
    code = relay.close_code
    if relay.closed_by == "upstream":
        return f"upstream ended the session at once ({code})" if code in _EARLY_CODES else None
    if relay.closed_by == "sidecar" and code in _BROKEN and relay.close_reason.startswith("upstream: "):
        return f"upstream broke the protocol at once ({relay.close_reason})"
    return None


def _only_close(frames: tuple[int, ...]) -> bool:
    """Whether a direction relayed no frame but a close (the client's answer to the
    provider's counts as none). Frames are counted as their header goes on."""
    return sum(frames) == frames[_CLOSE]


def _thousandths(seconds: float) -> float:
    """`round(seconds, 3)` for the non-negative figures of a log line: `round` with
    digits goes through a decimal conversion, 2.8 k instructions a call."""
    return int(seconds * 1000 + 0.5) / 1000


class Sidecar:
    def __init__(self, config: Config, keyset: KeySet, router: Router | None = None):
        self.config = config
        self.limits = config.limits
        self.keyset = keyset
        self.router = router or Router(config)
        self.sessions: set[SessionInfo] = set()
        self.pending = Slots(self.limits.max_connections)  # connections without a session
        self.lingering = Slots(self.limits.max_connections)  # ... and those in their lingering close
        self.linger: Callable[[asyncio.Transport], bool] = functools.partial(linger, self.lingering)
        self.opening: set[asyncio.Task] = set()  # open_session tasks under way
        # (end of its first second, session) per relayed session whose connect's verdict
        # is owed (judge), oldest first: the poll gives those that lived theirs.
        self.trials: collections.deque[tuple[float, SessionInfo]] = collections.deque()
        self.live_per_key: collections.Counter[str] = collections.Counter()
        self.draining = False
        self.closing = False  # drain_seconds are over (or a second signal came)
        self.holding: set[held.Reader] = set()
        # Rejections of peers whose key was not accepted (4001: none, unknown, disabled,
        # expired), made as fast as they connect; a known key's are its own kind.
        self.unaccepted = logs.Limited(log, ("event", "code", "reason", "key_id"))
        self.metrics = Metrics(
            lambda: len(self.sessions),
            lambda: self.pending.taken,
            lambda: self.lingering.taken,
            config.audio.bytes_per_second,
        )
        self.router.on_secret_reload = lambda result: self.metrics.provider_secret_reload.inc(result)
        self.balancer = Balancer(self.router, config, self.metrics)
        self.model_labels: set[str] = set()
        self.governor = Governor(
            config, self.metrics, self.sessions, self.live_per_key, self.model_label, self.entry_of
        )
        self.servers: list[asyncio.AbstractServer] = []
        self.admin: AdminServer | None = None
        self.watcher: KeyWatcher | None = None
        self.poller: asyncio.Task | None = None
        self.tls: ListenerTLS | None = None
        self.stopped: asyncio.Event | None = None
        self.listening: dict[str, tuple[str, int]] = {}
        self.signed_urls = SignedUrls()
        self.trimmer = Trimmer()
        # Bound once: every session's relay holds these two (a bound method made per
        # session would cost each idle session 128 bytes).
        self.session_ended = self.session_ended  # type: ignore[method-assign]
        self.provider_message = self.provider_message  # type: ignore[method-assign]

    # -- admission ---------------------------------------------------------------

    def admission(self) -> Admission:
        # With a shared store, max_connections is held by cluster-wide leases (govern).
        return Admission(
            self.keyset,
            self.router,
            dt.datetime.now(dt.UTC),
            {} if self.governor.shared else self.live_per_key,
            len(self.sessions) >= self.limits.max_connections,
            self.draining,
            self.config.allowed_origins,
            self.signed_urls.issued_to,
        )

    async def govern(self, info: SessionInfo) -> tuple[int, str] | None:
        """Budgets, session rate and cluster-wide leases: None, or (close code, reason)."""
        return await self.governor.admit(info)

    def started(self, info: SessionInfo) -> None:
        self.governor.started(info)
        if info.trial is not None:
            self.trials.append((time.monotonic() + _EARLY_SECONDS, info))

    def lived(self, now: float) -> None:
        """Sessions whose first second is over: their connects were good. From the poll,
        not a timer (one per session held 0.6 KiB each through its first second, and a
        shared one cost each session 2% more instructions): a verdict comes up to
        keys_poll_seconds late."""
        trials = self.trials
        while trials and trials[0][0] <= now:
            info = trials.popleft()[1]
            if info.trial is not None and info.upstream is not None:  # (None: judged at its end)
                info.trial = None
                self.balancer.succeeded(info.upstream)

    def connected(self, info: SessionInfo, seconds: float) -> None:
        self.metrics.upstream_connect.observe(seconds, info.provider)

    def reserve(self, info: SessionInfo) -> None:
        self.sessions.add(info)
        self.live_per_key[info.key_id] += 1
        self.trimmer.grew(len(self.sessions))

    def release(self, info: SessionInfo) -> None:
        if info in self.sessions:
            self.sessions.discard(info)
            self.live_per_key[info.key_id] -= 1
            if self.live_per_key[info.key_id] <= 0:
                del self.live_per_key[info.key_id]
            if info.upstream is not None:
                self.judge(info, info.upstream)
        self.governor.release(info)
        if self.draining and not self.sessions and self.stopped is not None:
            self.stopped.set()

    def judge(self, info: SessionInfo, h: Health) -> None:
        """The session has ended: the verdict on its connect if still owed (within its
        first second, or before its relay). A 101 says little: a deployment out of
        quota may accept every session and end it at once, and counted as good it was
        never rested. The provider's 1011 or lost connection before any client frame
        but a close reached it (`info.relay` is still set) is the deployment's failure:
        no client input can have caused it, so no tenant can rest a deployment for
        everyone. Anything else succeeded."""
        probe, info.trial = info.trial, None
        relay = info.relay
        if probe is not None and relay is not None and _only_close(relay.counters(0)[0]):
            why = _ended_by_provider(relay)
            if why is not None:
                failed = Failed("early_close", why, "early close")
                self.balancer.failed(h, failed, probe, info.id)  # ends its attempt
                return
        if probe is not None:  # ended before its relay started, or not at once
            self.balancer.succeeded(h)
        h.release()  # least_sessions counts live sessions

    def greeting_failed(self, info: SessionInfo, refused: held.Refused) -> None:
        """The provider failed the session while its first message was awaited (Deepgram's
        agent, before its Welcome; the client's Settings is held until then, so no
        client frame reached it): an early close, judged now when it is the provider's
        doing (a close by its code, as judge's). Otherwise release() judges it."""
        h, probe = info.upstream, info.trial
        if h is None or probe is None:
            return
        if not (refused.fault or (refused.close is not None and refused.close[0] in _EARLY_CODES)):
            return
        info.upstream = info.trial = None  # judged here: release() has no verdict left to give
        self.balancer.failed(h, Failed("early_close", f"upstream: {refused}", "early close"), probe, info.id)

    def count(self, result: str) -> None:
        self.metrics.connections.inc(result)

    def failed(self, closed: bool) -> None:
        """A bug of ours ended a session while it opened: 500, or (`closed`) 1011 after
        its 101, a sidecar close as its refusals are."""
        self.count("internal_error")
        if closed:
            self.metrics.closes.inc("sidecar", str(_relay.CloseCode.INTERNAL_ERROR))

    def signed_url(self, status: int) -> None:
        self.metrics.signed_urls.inc(str(status))

    def tls_leg(self, leg: str, kernel: bool) -> None:
        self.metrics.tls_legs.inc(leg, "kernel" if kernel else "openssl")

    def auth_failed(self, why: Rejection) -> None:
        self.metrics.auth_failures.inc(why.label)

    def rejected(self, decision: Close, info: SessionInfo | None = None) -> None:
        """A session refused after its upgrade: `info` once it was admitted (its id
        joins this line to its upstream_attempt lines), None when decide refused it."""
        # The result label is the close code's name: auth_failed, key_limit, upstream_failed...
        self.count(_relay.CloseCode(decision.code).name.lower())
        if decision.rejection is not None:
            self.auth_failed(decision.rejection)
        self.metrics.closes.inc("sidecar", str(decision.code))
        fields = {
            "event": "rejected",
            "session_id": info.id if info is not None else None,
            "code": decision.code,
            "reason": decision.reason,
            "key_id": decision.key.id if decision.key else None,
        }
        if decision.key is None or decision.rejection is not None:  # no key accepted (4001)
            self.unaccepted.info("session rejected", fields)
        else:
            logs.info(log, "session rejected", fields)

    def session_ended(self, relay) -> None:
        info: SessionInfo = relay.session
        self.release(info)  # with info.relay still set: the audio since the last tick counts
        info.relay = None
        duration = time.monotonic() - info.started
        self.metrics.duration.observe(duration)
        code = relay.close_code if relay.close_code is not None else 1006
        side = relay.closed_by or "unknown"
        self.metrics.closes.inc(side, _close_label(side, code))
        c2u, u2c = relay.counters(0), relay.counters(1)
        per_second = self.governor.rate(info)  # the format its query names, else [audio]'s
        usage = info.usage or _NO_USAGE
        logs.info(
            log,
            "session ended",
            {
                "event": "session_end",
                "session_id": info.id,
                "key_id": info.key_id,
                "model": info.model,
                "provider": info.provider,
                "deployment": info.upstream.target.label if info.upstream else None,
                "duration_seconds": _thousandths(duration),
                "frames_client_to_upstream": sum(c2u[0]),
                "frames_upstream_to_client": sum(u2c[0]),
                "bytes_client_to_upstream": c2u[2],
                "bytes_upstream_to_client": u2c[2],
                "closed_by": relay.closed_by,
                "close_code": code,
                "close_reason": relay.close_reason,
                "audio_seconds_client_to_upstream": _thousandths(c2u[1][_BINARY] / per_second),
                "audio_seconds_upstream_to_client": _thousandths(u2c[1][_BINARY] / per_second),
                "usage_tokens": usage.tokens,
                "usage_seconds": usage.seconds,
            },
        )

    def provider_message(self, relay, message: bytes) -> None:
        """A provider message that may report usage (see metering). Called by the
        relay: whatever the message holds, nothing may raise into it."""
        info: SessionInfo = relay.session
        metered = info.metered
        try:
            counts = metered.decode(message) if metered else None
        except (MalformedUsage, RecursionError):  # RecursionError: nested past msgspec's depth
            self.metrics.usage_malformed.inc(info.provider)
            return
        if counts is None:
            if metered and metered.transcriber and (named := metered.transcriber(message)):
                if not info.key.allows_model(named):
                    # A conversation session's transcription model is named in a client
                    # update the sidecar does not hold back: the provider's word that it
                    # took it ends the session, before any audio is transcribed.
                    self._refuse_later(info, relay, f"transcription model {named!r} not allowed for this key")
                    return
                if info.usage is None:
                    info.usage = Usage()
                info.usage.transcriber = sys.intern(named)
            return
        assert metered is not None  # it decoded the counts
        try:
            if info.usage is None:
                info.usage = Usage()
            billed = info.model
            if isinstance(counts, Transcription) and info.usage.transcriber:
                billed = info.usage.transcriber
            counts = info.usage.add(counts, metered.cumulative)
            model = self.model_label(billed)
            for kind, n in counts.items():
                if n:
                    family = self.metrics.usage_seconds if kind in SECONDS_KINDS else self.metrics.usage
                    family.add(n, info.key_id, info.provider, model, kind)
            self.governor.usage(info, counts, model, billed)
        except Exception as exc:  # a bug of ours must not end the session
            self.metrics.usage_malformed.inc(info.provider)
            log.warning(
                "usage not counted",
                extra={"event": "usage_error", "session_id": info.id, "error": type(exc).__name__},
            )

    def client_message(self, later, relay, message: bytes) -> None:
        """A later client text message of a session `later` (held.later_*) reads, which
        the relay withholds from the provider until this returns: a model the key may
        not use (its current entry), a virtual key, or a message the provider could
        read otherwise ends the session instead. Nothing may raise into the relay."""
        if not held.may_name(message):
            return
        info: SessionInfo = relay.session
        code: int
        try:
            models = later(message)
            barred = next((m for m in models if not info.key.allows_model(m)), None)
            if barred is None:
                if models and later is held.later_transcription:
                    info.model = models[0]  # what its usage is priced at from now on
                return
            code, reason = _relay.CloseCode.FORBIDDEN, f"model {barred!r} not allowed for this key"
        except held.Refused as exc:
            code, reason = exc.code, str(exc)
        except Exception:  # a bug of ours: the message is not let through unread
            log.exception("later message unread", extra={"event": "internal_error", "session_id": info.id})
            code, reason = _relay.CloseCode.INTERNAL_ERROR, "internal error"
        self._refuse_later(info, relay, reason, code)

    def _refuse_later(
        self, info: SessionInfo, relay, reason: str, code: int = _relay.CloseCode.FORBIDDEN
    ) -> None:
        """End a relayed session for what a later message asked."""
        log.info(
            "later message refused",
            extra={
                "event": "message_refused",
                "session_id": info.id,
                "key_id": info.key_id,
                "code": code,
                "reason": reason,
            },
        )
        relay.close(code, reason, _relay.CloseCode.NORMAL, "")

    def model_label(self, model: str | None) -> str:
        """Models come from clients: only a bounded number become label values."""
        model = model or ""
        if model not in self.model_labels and len(self.model_labels) >= MODEL_LABELS_MAX:
            return "other"
        self.model_labels.add(model)
        return model

    # -- keys --------------------------------------------------------------------

    def on_keys(self, keyset: KeySet | None) -> None:
        if keyset is None:
            self.metrics.keys_reload.inc("invalid")
            return
        self.metrics.keys_reload.inc("ok")
        self.keyset = keyset  # the poll rechecks live sessions right after
        self.metrics.forget_keys(keyset.by_id)

    def entry_of(self, key_id: str) -> KeyEntry | None:
        return self.keyset.by_id.get(key_id)

    def recheck_keys(self) -> None:
        """Live sessions hold only while their key does: a removed, rotated (same id,
        new hash), disabled or expired key ends them with 4001, and so does a key that
        no longer lists the public agent a key-less session was admitted for."""
        now = dt.datetime.now(dt.UTC)
        for info in list(self.sessions):
            current, reason = self.keyset.recheck(info.key, now, info.public_agent)
            running = info.relay is not None and not info.relay.finished
            if current is not None and not reason:  # (a renamed entry is not the session's)
                recap = current.max_session_seconds != info.key.max_session_seconds
                info.key = current
                if recap and running:
                    self.governor.recapped(info)  # (one still opening starts with the new cap)
            if reason and info.relay is not None and not info.relay.finished:
                info.relay.close(_relay.CloseCode.AUTH_FAILED, reason.value, _relay.CloseCode.NORMAL, "")

    # -- lifecycle ---------------------------------------------------------------

    def _listening(self, name: str, server: asyncio.Server) -> None:
        self.servers.append(server)
        self.listening[name] = server.sockets[0].getsockname()[:2]
        if self.config.limits.socket_buffer_bytes:  # (before the loop turns to accept)
            for sock in server.sockets:
                bound_kernel_buffers(sock, self.config.limits.socket_buffer_bytes)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        kernel_tls = ktls.switch(self.config.kernel_tls)
        _relay.redact_close_reasons(redact.redact)
        _relay.linger_closes(self.linger)
        host, port = split_hostport(self.config.listen)
        server = await loop.create_server(
            lambda: ClientHandshake(self), host, port, reuse_address=True, backlog=4096
        )
        self._listening("listen", server)
        if self.config.tls is not None:
            self.tls = ListenerTLS(self.config.tls)
            host, port = split_hostport(self.config.tls.listen)
            if _relay.NATIVE_TLS:
                # The relay encrypts these legs itself; ClientHandshake's timer covers
                # the TLS handshake as well as the upgrade request.
                context = self.tls.context
                server = await loop.create_server(
                    lambda: TLSStream(context, ClientHandshake(self), server_side=True),
                    host,
                    port,
                    reuse_address=True,
                    backlog=4096,
                )
            else:
                server = await loop.create_server(
                    lambda: ClientHandshake(self),
                    host,
                    port,
                    ssl=self.tls.context,
                    ssl_handshake_timeout=self.config.limits.handshake_timeout_seconds,
                    reuse_address=True,
                    backlog=4096,
                )
            self._listening("tls", server)
        self.admin = AdminServer(
            self.config.admin_listen,
            self.metrics.registry,
            ready=lambda: self.ready,
            draining=lambda: self.draining,
            drain=self.drain,
        )
        self.listening["admin"] = await self.admin.start()
        self.watcher = KeyWatcher(self.config.keys_file, self.keyset, self.on_keys)
        self.poller = loop.create_task(self._poll())
        self.governor.start()
        log.info(
            "started",
            extra={
                "event": "start",
                "version": __version__,
                "listen": "{}:{}".format(*self.listening["listen"]),
                "admin_listen": "{}:{}".format(*self.listening["admin"]),
                "tls_listen": "{}:{}".format(*self.listening["tls"]) if "tls" in self.listening else None,
                "tls_relay": "openssl" if _relay.NATIVE_TLS else "uvloop",
                "kernel_tls": "on" if kernel_tls is None else f"off: {kernel_tls}",
                "providers": self.router.configured,
                "keys": len(self.keyset),
            },
        )

    async def _poll(self) -> None:
        """Mounted Secrets change by file swaps: check keys and certificates."""
        while True:
            await asyncio.sleep(self.config.keys_poll_seconds)
            assert self.watcher is not None  # start() made it before this task
            try:
                self.watcher.check()
                self.recheck_keys()  # expiry passes without a file change
                if self.tls is not None and (result := self.tls.check()):
                    self.metrics.tls_reload.inc(result)
                if self.config.limits.idle_timeout_seconds:
                    self.close_idle(time.monotonic())
                self.lived(time.monotonic())
                self.drop_left()
                self.trimmer.check(len(self.sessions))
            except Exception:  # a bug of ours: key rechecks and the rest need the next poll
                log.exception("poll failed", extra={"event": "internal_error"})

    def drop_left(self) -> None:
        """Paused legs' resets and ends, which uvloop does not poll. Not a loop in
        `_poll`: its variable would keep the last session (and the arena it lies in)
        alive in that coroutine's frame until the next poll that sees a session."""
        for info in list(self.sessions):
            if info.relay is not None and not info.relay.finished:
                info.relay.drop_left()

    def close_idle(self, now: float) -> None:
        """Sessions that relayed no byte for idle_timeout_seconds get 1001."""
        limit = self.config.limits.idle_timeout_seconds
        for info in list(self.sessions):
            relay = info.relay
            if relay is None or relay.finished:
                continue
            activity = relay.activity
            if activity != info.seen_activity:
                info.seen_activity, info.active_at = activity, now
            elif now - info.active_at >= limit:
                relay.close(
                    _relay.CloseCode.GOING_AWAY, "idle timeout", _relay.CloseCode.GOING_AWAY, "idle timeout"
                )

    @property
    def ready(self) -> bool:
        return bool(self.servers) and not self.draining and (self.tls is None or self.tls.ready)

    def drain(self) -> None:
        """Stop admitting sessions; close the remaining ones after drain_seconds."""
        if self.draining:
            return
        self.draining = True
        log.info(
            "draining",
            extra={
                "event": "drain",
                "sessions": len(self.sessions),
                "drain_seconds": self.config.limits.drain_seconds,
            },
        )
        loop = asyncio.get_running_loop()
        loop.call_later(self.config.limits.drain_seconds, self.close_all)
        if not self.sessions and self.stopped is not None:  # None: not started
            self.stopped.set()

    def close_all(self) -> None:
        """1001 to every session; those still opening get it once their upstream has
        answered (or failed), within its timeouts, and release themselves then."""
        self.closing = True
        for info in list(self.sessions):
            if info.relay is not None and not info.relay.finished:
                info.relay.close(_relay.CloseCode.GOING_AWAY, "going away", _relay.CloseCode.NORMAL, "")
        for reader in list(self.holding):
            reader.going_away()

    async def stop(self) -> None:
        if self.poller:
            self.poller.cancel()
        for server in self.servers:
            server.close()
        if self.admin:
            await self.admin.stop()
        for info in list(self.sessions):
            if info.relay is not None:
                info.relay.abort()
        # Sessions still opening (a second signal does not wait for them) release what
        # they hold, their leases included, before the governor stops: cancelled by the
        # loop's close instead, their releases would come after the store is closed.
        opening = list(self.opening)
        for task in opening:
            task.cancel()
        await asyncio.gather(*opening, return_exceptions=True)
        # The aborted relays end at their connection_lost, a loop turn or two from now:
        # their releases (the last usage, the leases) go to the governor before it stops.
        for _ in range(10):
            if not any(info.relay is not None for info in self.sessions):
                break
            await asyncio.sleep(0)
        await self.governor.stop()

    async def run(self, early: Sequence[int] = ()) -> int:
        """Serve until SIGTERM/SIGINT (then drain) or a second signal (then stop at once).
        `early`: signals that came before this took them over (start-up)."""
        asyncio.get_running_loop().set_exception_handler(logs.loop_error)
        await self.start()
        # Live sessions are long-lived objects the cyclic GC would traverse again and
        # again; sessions free themselves by reference counting (the relay breaks its
        # cycles when it ends), so collect rarely and never scan start-up objects.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        self.trimmer.trim()
        loop = asyncio.get_running_loop()
        signals = 0
        stopped = self.stopped
        assert stopped is not None  # start() made it

        def on_signal():
            nonlocal signals
            signals += 1
            if signals == 1:
                self.drain()
            else:
                self.close_all()
                stopped.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        for _ in early:
            on_signal()
        await stopped.wait()
        if self.sessions and signals < 2:
            # Sessions were told 1001; give their closing handshakes a moment.
            deadline = loop.time() + self.config.limits.close_timeout_seconds
            while self.sessions and loop.time() < deadline and signals < 2:
                await asyncio.sleep(0.05)
        if self.opening and signals < 2:
            # No session is left: get-signed-url calls under way still get their answer,
            # each within the connect timeout (those made from now on are not waited for),
            # begun before this wait. Then the close timeout to answer: a wait as long as
            # theirs ran out in the loop turn of their timeouts when the loop was held up
            # past both, and cut the answers.
            calls = list(self.opening)
            limits = self.config.limits
            deadline = loop.time() + limits.upstream_connect_timeout_seconds + limits.close_timeout_seconds
            while not all(call.done() for call in calls) and loop.time() < deadline and signals < 2:
                await asyncio.sleep(0.05)
        await self.stop()
        unkeyed.flush()
        self.unaccepted.flush()
        log.info("stopped", extra={"event": "stop"})
        return 0
