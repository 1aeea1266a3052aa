"""Provider host names, resolved once per `dns_cache_seconds` rather than once per
session (and per signed-URL fetch): a session's upstream connect otherwise waits for
a lookup in libuv's thread pool, and in a Kubernetes pod (`ndots:5`) a name like `api.openai.com` is
first tried under each search domain. nginx resolves its upstreams once at start-up;
Envoy re-resolves on a timer and keeps the last good addresses when DNS fails.

Here the first session after the limit starts a lookup in the background and goes on
with the last good addresses, which serve until the lookup brings new ones; a failed
lookup leaves them in use (asked again after a second). A host has no addresses at
all before its first good lookup, after none of its addresses took a connection
(`upstream` also drops them when the connect timed out), or with
`dns_cache_seconds = 0`: then a session waits for a lookup, shared by the
sessions that need it at the same moment, and a failed one is not kept. A literal
address is never looked up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable

__all__ = ["Resolver"]

_ENTRIES_MAX = 256  # hosts come from the config's URL templates: a handful
_RETRY_SECONDS = 1.0  # after a failed lookup, the last good addresses serve this long


class _Entry:
    __slots__ = ("addresses", "expires", "lookup")

    def __init__(self):
        self.addresses: list[tuple[str, int]] | None = None  # of the last good lookup
        self.expires = 0.0  # monotonic
        self.lookup: asyncio.Task | None = None  # under way


class Resolver:
    """`connect` opens a TCP connection to a provider's host through the cache;
    `lookups` is called with "ok" or "error" for each lookup it makes."""

    __slots__ = ("ttl", "entries", "literal", "lookups")

    def __init__(self, ttl: float, lookups: Callable[[str], None]):
        self.ttl = ttl
        self.lookups = lookups
        self.entries: dict[tuple[str, int], _Entry] = {}
        self.literal: dict[str, bool] = {}  # host -> whether it is an address

    def connect(
        self, factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> Awaitable[tuple[asyncio.Transport, asyncio.Protocol]]:
        """`loop.create_connection` to the first of the host's addresses that takes
        it; if none does, the host is forgotten and the last error raised. A literal
        address goes to `create_connection` as it is."""
        if self._literal(host):
            return asyncio.get_running_loop().create_connection(factory, host, port)
        return self._connect(factory, host, port)

    async def addresses(self, host: str, port: int) -> list[tuple[str, int]]:
        """The (address, port) pairs `connect` would try, in order, for a connection
        made elsewhere (the signed-URL fetch, in a thread), whose caller `forget`s the
        host when none of them takes it. Raises OSError (socket.gaierror)."""
        if self._literal(host):
            return [(host, port)]
        return self.cached(host, port) or await self._looked_up(host, port)

    def _literal(self, host: str) -> bool:
        literal = self.literal.get(host)
        if literal is None:
            if len(self.literal) >= _ENTRIES_MAX:
                self.literal.clear()
            literal = self.literal[host] = _literal(host)
        return literal

    async def _connect(
        self, factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        loop = asyncio.get_running_loop()
        error: OSError | None = None
        for address in self.cached(host, port) or await self._looked_up(host, port):
            try:
                return await loop.create_connection(factory, *address)
            except OSError as exc:
                error = exc
        self.forget(host, port)  # none takes a connection: the next session waits for a lookup
        assert error is not None  # a lookup gives at least one address
        raise error

    def cached(self, host: str, port: int) -> list[tuple[str, int]] | None:
        """The host name's last good addresses; None when it has none. Past the limit,
        the first caller starts a lookup in the background."""
        entry = self.entries.get((host, port))
        if entry is None or entry.addresses is None:
            return None
        if entry.expires <= time.monotonic():
            if not self.ttl:
                return None  # no caching: every session waits for its lookup
            if entry.lookup is None:
                self._start(host, port, entry)
        return entry.addresses

    async def _looked_up(self, host: str, port: int) -> list[tuple[str, int]]:
        """For a host with no addresses to go on: (address, port) pairs from a lookup,
        the one under way if there is one. Raises OSError (socket.gaierror)."""
        key = (host, port)
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= _ENTRIES_MAX:
                del self.entries[next(iter(self.entries))]  # the oldest
            entry = self.entries[key] = _Entry()
        lookup = entry.lookup or self._start(host, port, entry)
        return await asyncio.shield(lookup)  # a waiter that leaves keeps it running

    def _start(self, host: str, port: int, entry: _Entry) -> asyncio.Task:
        lookup = entry.lookup = asyncio.get_running_loop().create_task(self._lookup(host, port))
        lookup.add_done_callback(lambda done: self._ended(host, port, entry, done))
        return lookup

    async def _lookup(self, host: str, port: int) -> list[tuple[str, int]]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except UnicodeError:  # the IDNA encoding refused it (an empty or too long label)
            raise socket.gaierror(socket.EAI_NONAME, "invalid host name") from None
        except OSError as exc:
            try:
                socket.socket().close()
            except OSError as starved:
                # Out of descriptors, the lookup could neither read /etc/hosts nor ask a
                # name server, and said the name does not exist: the fault is ours.
                raise starved from exc
            raise
        # (address, port, ...) of AF_INET and AF_INET6, in the resolver's order
        return list(dict.fromkeys((str(info[4][0]), int(info[4][1])) for info in infos))

    def _ended(self, host: str, port: int, entry: _Entry, lookup: asyncio.Task) -> None:
        entry.lookup = None
        failed = lookup.cancelled() or lookup.exception() is not None
        self.lookups("error" if failed else "ok")
        if not failed:
            entry.addresses, entry.expires = lookup.result(), time.monotonic() + self.ttl
        elif entry.addresses is None:
            self.forget(host, port, entry)  # nothing to go on with: not kept
        else:
            entry.expires = time.monotonic() + min(self.ttl, _RETRY_SECONDS)

    def forget(self, host: str, port: int, entry: _Entry | None = None) -> None:
        """Drop the host's addresses (only `entry`'s, when given): the next session
        waits for a lookup, the one under way if there is one. (A session that timed
        out waiting for a slow lookup dropped it too: its answer was lost, and each
        session after it timed out in a lookup of its own.)"""
        key = (host, port)
        current = self.entries.get(key)
        if current is None or (entry is not None and current is not entry):
            return
        if current.lookup is not None:
            current.addresses = None  # the lookup under way brings the next ones
        else:
            del self.entries[key]


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
