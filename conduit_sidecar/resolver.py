"""Provider host names, resolved once per `dns_cache_seconds` rather than once per
session: a session's upstream connect otherwise waits for a lookup in libuv's
thread pool, and in a Kubernetes pod (`ndots:5`) a name like `api.openai.com` is
first tried under each search domain. nginx resolves its upstreams once at start-up;
Envoy re-resolves on a timer; this cache re-resolves when an entry is older than
the limit or when every address it gave failed to connect.

Sessions that miss together share one lookup. A failed lookup is not kept: the next
session asks again. A literal address is never looked up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable

__all__ = ["Resolver"]

_ENTRIES_MAX = 256  # hosts come from the config's URL templates: a handful
_FOREVER = float("inf")


class Resolver:
    """`connect` opens a TCP connection to a provider's host through the cache;
    `lookups` is called with "ok" or "error" for each lookup it makes."""

    __slots__ = ("ttl", "entries", "literal", "lookups")

    def __init__(self, ttl: float, lookups: Callable[[str], None]):
        self.ttl = ttl
        self.lookups = lookups
        # (host, port) -> [expiry (monotonic), the lookup: done, or shared while it runs]
        self.entries: dict[tuple[str, int], list] = {}
        self.literal: dict[str, bool] = {}  # host -> whether it is an address

    def connect(
        self, factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> Awaitable[tuple[asyncio.Transport, asyncio.Protocol]]:
        """`loop.create_connection` to the first of the host's addresses that takes
        it; if none does, the host is forgotten and the last error raised. A literal
        address goes to `create_connection` as it is."""
        literal = self.literal.get(host)
        if literal is None:
            if len(self.literal) >= _ENTRIES_MAX:
                self.literal.clear()
            literal = self.literal[host] = _literal(host)
        if literal:
            return asyncio.get_running_loop().create_connection(factory, host, port)
        return self._connect(factory, host, port)

    async def _connect(
        self, factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        loop = asyncio.get_running_loop()
        try:
            error: OSError | None = None
            for address in self.cached(host, port) or await self.addresses(host, port):
                try:
                    return await loop.create_connection(factory, *address)
                except OSError as exc:
                    error = exc
            assert error is not None  # a lookup gives at least one address
            raise error
        except BaseException:  # failed, timed out, or the client left: ask again next time
            self.forget(host, port)
            raise

    def cached(self, host: str, port: int) -> list[tuple[str, int]] | None:
        """The host name's addresses while they are fresh; else None."""
        entry = self.entries.get((host, port))
        if entry is not None and entry[1].done() and entry[0] > time.monotonic():
            return entry[1].result()
        return None

    async def addresses(self, host: str, port: int) -> list[tuple[str, int]]:
        """(address, port) pairs to try in order. Raises OSError (socket.gaierror)."""
        cached = self.cached(host, port)
        if cached is not None:
            return cached
        key = (host, port)
        entry = self.entries.get(key)
        if entry is None or entry[1].done():  # none, or expired
            lookup = asyncio.get_running_loop().create_task(self._lookup(host, port))
            entry = [_FOREVER, lookup]
            self.forget(host, port)
            if len(self.entries) >= _ENTRIES_MAX:
                del self.entries[next(iter(self.entries))]  # the oldest
            self.entries[key] = entry
            lookup.add_done_callback(lambda done: self._ended(key, entry, done))
        return await asyncio.shield(entry[1])  # a waiter that leaves keeps it running

    async def _lookup(self, host: str, port: int) -> list[tuple[str, int]]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except UnicodeError:  # the IDNA encoding refused it (an empty or too long label)
            raise socket.gaierror(socket.EAI_NONAME, "invalid host name") from None
        # (address, port, ...) of AF_INET and AF_INET6, in the resolver's order
        return list(dict.fromkeys((str(info[4][0]), int(info[4][1])) for info in infos))

    def _ended(self, key: tuple[str, int], entry: list, lookup: asyncio.Task) -> None:
        failed = lookup.cancelled() or lookup.exception() is not None
        self.lookups("error" if failed else "ok")
        if failed:
            self.forget(*key, entry)
        else:
            entry[0] = time.monotonic() + self.ttl

    def forget(self, host: str, port: int, entry: list | None = None) -> None:
        """Drop the host's addresses (only `entry`, when given): the next session
        looks it up again."""
        key = (host, port)
        if key in self.entries and (entry is None or self.entries[key] is entry):
            del self.entries[key]


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
