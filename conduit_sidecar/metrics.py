"""Prometheus metrics. Frame and byte counts live in C inside the relay, the
sidecar's own counts in plain numbers (Tally, Spread); collectors read them at
scrape time and prometheus-client exposes them. Relaying pays no Python per frame,
and a session's counts no lock each."""

from __future__ import annotations

import itertools
import platform
from bisect import bisect_left
from collections.abc import Container

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from . import __version__, _relay

__all__ = ["Metrics"]

# No `<name>_created` gauge beside each counter and histogram (a series per label set,
# the time it was made): metrics nobody asked for, doubling the counters' series.
disable_created_metrics()

_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
# The usage families' labels (the cost's: the first three); key_id is dropped by forget_keys
_USAGE_LABELS = ("key_id", "provider", "model", "kind")
_CONNECT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))
# A store beside the pod answers within a millisecond: from 0.1 ms, or every call falls
# in the first bucket and any percentile reads as that bucket's bound.
_STATE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    float("inf"),
)


def _buckets(les: list[str], counts) -> list[tuple[str, float]]:
    """A histogram's buckets as prometheus-client takes them: each `le` with the
    count at or below it."""
    return list(zip(les, itertools.accumulate(counts), strict=True))


class Tally:
    """A counter family counted in plain numbers, one per label values, read at scrape
    time: prometheus-client's children take a lock and check their state on every
    call, and a session counts five times on its way (3% of its instructions,
    docs/benchmarks.md, "Where a session's CPU goes"). The event loop's thread alone
    counts and scrapes."""

    __slots__ = ("name", "doc", "labels", "counts")

    def __init__(self, registry: CollectorRegistry, name: str, doc: str, labels: tuple[str, ...]):
        self.name, self.doc, self.labels = name, doc, labels
        self.counts: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, *values: str) -> None:
        counts = self.counts
        counts[values] = counts.get(values, 0.0) + 1

    def add(self, amount: float, *values: str) -> None:
        counts = self.counts
        counts[values] = counts.get(values, 0.0) + amount

    def collect(self):
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for values, n in self.counts.items():
            family.add_metric(values, n)
        yield family


class Spread:
    """A histogram family the same way: per label values, the sum and each bucket's
    count. Without labels its one series is there from the start, as
    prometheus-client's."""

    __slots__ = ("name", "doc", "labels", "bounds", "les", "series")

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        doc: str,
        labels: tuple[str, ...],
        bounds: tuple[float, ...],
    ):
        self.name, self.doc, self.labels = name, doc, labels
        self.bounds = bounds  # ascending, the last +Inf
        self.les = [floatToGoString(b) for b in bounds]
        self.series: dict[tuple[str, ...], list[float]] = {}
        if not labels:
            self._start(())
        registry.register(self)

    def _start(self, values: tuple[str, ...]) -> list[float]:
        series = self.series[values] = [0.0] + [0] * len(self.bounds)
        return series

    def observe(self, amount: float, *values: str) -> None:
        series = self.series.get(values) or self._start(values)
        series[0] += amount
        series[1 + bisect_left(self.bounds, amount)] += 1  # the first bucket whose bound is >= amount

    def collect(self):
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for values, series in self.series.items():
            family.add_metric(values, _buckets(self.les, series[1:]), series[0])
        yield family


_RELAY_LES = [floatToGoString(b) for b in _relay.HISTOGRAM_BOUNDS + (float("inf"),)]


class _RelayCollector:
    """Process totals of the C counters (live and ended sessions alike)."""

    def __init__(self, audio_bytes_per_second: int):
        self.audio_bytes_per_second = audio_bytes_per_second

    def collect(self):
        frames, payload, wire, hist, hist_sum = _relay.totals()
        f = CounterMetricFamily("conduit_frames", "Frames relayed.", labels=["direction", "kind"])
        b = CounterMetricFamily(
            "conduit_bytes", "Bytes relayed on the wire (frame headers included).", labels=["direction"]
        )
        p = CounterMetricFamily(
            "conduit_payload_bytes", "Frame payload bytes relayed.", labels=["direction", "kind"]
        )
        a = CounterMetricFamily(
            "conduit_audio_seconds",
            "Audio relayed in binary frames, in seconds of the configured format.",
            labels=["direction"],
        )
        binary = _relay.KIND_NAMES.index("binary")
        for d, direction in enumerate(_relay.DIRECTION_NAMES):
            b.add_metric([direction], wire[d])
            a.add_metric([direction], payload[d][binary] / self.audio_bytes_per_second)
            for k, kind in enumerate(_relay.KIND_NAMES):
                f.add_metric([direction, kind], frames[d][k])
                p.add_metric([direction, kind], payload[d][k])
        h = HistogramMetricFamily(
            "conduit_relay_processing_seconds", "Time the relay spent per socket read (scan and forward)."
        )
        h.add_metric([], _buckets(_RELAY_LES, hist), hist_sum)
        yield from (f, b, p, a, h)


class Metrics:
    def __init__(self, sessions_active, pending, lingering, audio_bytes_per_second: int):
        r = self.registry = CollectorRegistry(auto_describe=True)
        Gauge("conduit_connections_active", "Sessions being relayed.", registry=r).set_function(
            sessions_active
        )
        Gauge(
            "conduit_connections_pending",
            "Connections without a session: sending their upgrade request, refused and awaiting a close, "
            "or waiting for a signed URL from the provider.",
            registry=r,
        ).set_function(pending)
        Gauge(
            "conduit_connections_lingering",
            "Connections in their lingering close (after a refusal, or a close sent before the peer's): "
            "what they still send is read and dropped.",
            registry=r,
        ).set_function(lingering)
        self.connections = Tally(r, "conduit_connections", "Client handshakes by outcome.", ("result",))
        self.duration = Spread(
            r, "conduit_connection_duration_seconds", "Session durations.", (), _DURATION_BUCKETS
        )
        self.upstream_connect = Spread(
            r,
            "conduit_upstream_connect_seconds",
            "Upstream TCP + TLS + WebSocket handshake time.",
            ("provider",),
            _CONNECT_BUCKETS,
        )
        self.upstream_attempts = Tally(
            r,
            "conduit_upstream_attempts",
            "Upstream connect attempts (and ElevenLabs signed-URL fetches) by deployment and outcome.",
            ("provider", "deployment", "outcome"),
        )
        self.upstream_tls_resumed = Tally(
            r,
            "conduit_upstream_tls_resumed",
            "Upstream connects whose TLS handshake resumed the deployment's previous session.",
            ("provider", "deployment"),
        )
        self.tls_legs = Tally(
            r,
            "conduit_tls_legs",
            "TLS legs handed to the relay, by leg (client, provider) and by what encrypts "
            "their sends (kernel TLS, or OpenSSL).",
            ("leg", "send"),
        )
        self.dns_lookups = Tally(
            r,
            "conduit_upstream_dns_lookups",
            "Provider host name lookups (first use, background refresh, after the addresses "
            "stopped connecting) by result.",
            ("result",),
        )
        self.deployment_healthy = Gauge(
            "conduit_deployment_healthy",
            "1 while a deployment's circuit is closed, 0 while it rests after failures.",
            ["provider", "deployment"],
            registry=r,
        )
        self.signed_urls = Tally(
            r, "conduit_signed_urls", "ElevenLabs get-signed-url calls answered, by HTTP status.", ("status",)
        )
        self.auth_failures = Tally(r, "conduit_auth_failures", "Rejected keys by reason.", ("reason",))
        self.closes = Tally(
            r, "conduit_closes", "Session ends by the side that closed first and code.", ("side", "code")
        )
        self.keys_reload = Tally(r, "conduit_keys_reload", "Key file reloads by result.", ("result",))
        self.tls_reload = Tally(
            r, "conduit_tls_reload", "[tls] certificate file reloads by result.", ("result",)
        )
        self.provider_secret_reload = Tally(
            r,
            "conduit_provider_secret_reload",
            "Provider secret_file rereads by result (invalid: the last good secret stays).",
            ("result",),
        )
        Gauge("conduit_build_info", "Build information.", ["version", "python"], registry=r).labels(
            __version__, platform.python_version()
        ).set(1)
        self.usage = Tally(
            r,
            "conduit_usage_tokens",
            "Tokens reported by providers' usage "
            "events; kinds input/output are totals, the others break them down.",
            _USAGE_LABELS,
        )
        self.usage_seconds = Tally(
            r,
            "conduit_usage_seconds",
            "Audio seconds reported by "
            "providers' usage events (Deepgram, AssemblyAI, OpenAI "
            "transcription by duration).",
            _USAGE_LABELS,
        )
        self.usage_malformed = Tally(
            r,
            "conduit_usage_malformed",
            "Provider usage events ignored as malformed (unreadable, negative or implausible counts).",
            ("provider",),
        )
        self.cost = Tally(
            r,
            "conduit_cost_usd",
            "Cost of reported usage in USD, from the configured prices.",
            _USAGE_LABELS[:3],
        )
        self.state_operations = Tally(
            r,
            "conduit_state_operations",
            "Calls to the state backend by operation and result.",
            ("op", "result"),
        )
        self.state_seconds = Spread(
            r,
            "conduit_state_operation_seconds",
            "State backend call latency (successful calls).",
            ("op",),
            _STATE_BUCKETS,
        )
        self.state_available = Gauge(
            "conduit_state_available", "1 while the state backend answers; 0 during an outage.", registry=r
        )
        self.state_fallbacks = Tally(
            r,
            "conduit_state_fallbacks",
            "Admissions decided while "
            "the state backend was unavailable, by outcome (local "
            "counts, or refused).",
            ("mode",),
        )
        r.register(_RelayCollector(audio_bytes_per_second))

    def forget_keys(self, kept: Container[str]) -> None:
        """Drop the series of key ids not in `kept` (the key file just read): their number
        is bounded by the key file, not by every file the process has read."""
        for family in (self.usage, self.usage_seconds, self.cost):
            for values in [values for values in family.counts if values[0] not in kept]:
                del family.counts[values]
