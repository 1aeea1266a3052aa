"""Prometheus metrics. Frame and byte counts live in C inside the relay; the
collector below reads them at scrape time, so relaying pays no Python per frame."""

from __future__ import annotations

import platform
from collections.abc import Container
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

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
        cumulative, buckets = 0, []
        for bound, count in zip(_relay.HISTOGRAM_BOUNDS + (float("inf"),), hist, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        h.add_metric([], buckets, hist_sum)
        yield from (f, b, p, a, h)


class Metrics:
    def __init__(self, sessions_active, pending, lingering, audio_bytes_per_second: int):
        self._children: dict[tuple, Any] = {}
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
        self.connections = Counter(
            "conduit_connections", "Client handshakes by outcome.", ["result"], registry=r
        )
        self.duration = Histogram(
            "conduit_connection_duration_seconds", "Session durations.", buckets=_DURATION_BUCKETS, registry=r
        )
        self.upstream_connect = Histogram(
            "conduit_upstream_connect_seconds",
            "Upstream TCP + TLS + WebSocket handshake time.",
            ["provider"],
            buckets=_CONNECT_BUCKETS,
            registry=r,
        )
        self.upstream_attempts = Counter(
            "conduit_upstream_attempts",
            "Upstream connect attempts (and ElevenLabs signed-URL fetches) by deployment and outcome.",
            ["provider", "deployment", "outcome"],
            registry=r,
        )
        self.upstream_tls_resumed = Counter(
            "conduit_upstream_tls_resumed",
            "Upstream connects whose TLS handshake resumed the deployment's previous session.",
            ["provider", "deployment"],
            registry=r,
        )
        self.tls_legs = Counter(
            "conduit_tls_legs",
            "TLS legs handed to the relay, by leg (client, provider) and by what encrypts "
            "their sends (kernel TLS, or OpenSSL).",
            ["leg", "send"],
            registry=r,
        )
        self.dns_lookups = Counter(
            "conduit_upstream_dns_lookups",
            "Provider host name lookups (first use, background refresh, after the addresses "
            "stopped connecting) by result.",
            ["result"],
            registry=r,
        )
        self.deployment_healthy = Gauge(
            "conduit_deployment_healthy",
            "1 while a deployment's circuit is closed, 0 while it rests after failures.",
            ["provider", "deployment"],
            registry=r,
        )
        self.signed_urls = Counter(
            "conduit_signed_urls",
            "ElevenLabs get-signed-url calls answered, by HTTP status.",
            ["status"],
            registry=r,
        )
        self.auth_failures = Counter(
            "conduit_auth_failures", "Rejected keys by reason.", ["reason"], registry=r
        )
        self.closes = Counter(
            "conduit_closes",
            "Session ends by the side that closed first and code.",
            ["side", "code"],
            registry=r,
        )
        self.keys_reload = Counter(
            "conduit_keys_reload", "Key file reloads by result.", ["result"], registry=r
        )
        self.tls_reload = Counter(
            "conduit_tls_reload", "[tls] certificate file reloads by result.", ["result"], registry=r
        )
        self.provider_secret_reload = Counter(
            "conduit_provider_secret_reload",
            "Provider secret_file rereads by result (invalid: the last good secret stays).",
            ["result"],
            registry=r,
        )
        Gauge("conduit_build_info", "Build information.", ["version", "python"], registry=r).labels(
            __version__, platform.python_version()
        ).set(1)
        self.usage = Counter(
            "conduit_usage_tokens",
            "Tokens reported by providers' usage "
            "events; kinds input/output are totals, the others break them down.",
            _USAGE_LABELS,
            registry=r,
        )
        self.usage_seconds = Counter(
            "conduit_usage_seconds",
            "Audio seconds reported by "
            "providers' usage events (Deepgram, AssemblyAI, OpenAI "
            "transcription by duration).",
            _USAGE_LABELS,
            registry=r,
        )
        self.usage_malformed = Counter(
            "conduit_usage_malformed",
            "Provider usage events ignored as malformed (unreadable, negative or implausible counts).",
            ["provider"],
            registry=r,
        )
        self.cost = Counter(
            "conduit_cost_usd",
            "Cost of reported usage in USD, from the configured prices.",
            _USAGE_LABELS[:3],
            registry=r,
        )
        self.state_operations = Counter(
            "conduit_state_operations",
            "Calls to the state backend by operation and result.",
            ["op", "result"],
            registry=r,
        )
        self.state_seconds = Histogram(
            "conduit_state_operation_seconds",
            "State backend call latency (successful calls).",
            ["op"],
            buckets=_STATE_BUCKETS,
            registry=r,
        )
        self.state_available = Gauge(
            "conduit_state_available", "1 while the state backend answers; 0 during an outage.", registry=r
        )
        self.state_fallbacks = Counter(
            "conduit_state_fallbacks",
            "Admissions decided while "
            "the state backend was unavailable, by outcome (local "
            "counts, or refused).",
            ["mode"],
            registry=r,
        )
        r.register(_RelayCollector(audio_bytes_per_second))

    def forget_keys(self, kept: Container[str]) -> None:
        """Drop the series of key ids not in `kept` (the key file just read): their number
        is bounded by the key file, not by every file the process has read."""
        # prometheus-client lists no children: the collected samples name them
        usage = (
            (self.usage, _USAGE_LABELS),
            (self.usage_seconds, _USAGE_LABELS),
            (self.cost, _USAGE_LABELS[:3]),
        )
        for family, names in usage:
            gone = {
                tuple(sample.labels[name] for name in names)
                for metric in family.collect()
                for sample in metric.samples
                if sample.labels["key_id"] not in kept
            }
            for values in gone:
                family.remove(*values)

    def child(self, family, *values: str):
        """`family.labels(*values)`, remembered: labels() checks its arguments and takes
        a lock on every call, and each session needs the same few children."""
        key = (family, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*values)
        return child
