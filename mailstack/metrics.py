# -*- test-case-name: tests.test_metrics -*-
"""Prometheus metrics (``listen.metrics``), served over HTTP at ``/metrics``.

``Metrics`` owns its own ``prometheus_client.CollectorRegistry`` (not the
library's global one, so two servers in one test process, or a library that
registers on the global one, cannot collide).  Components get it as
``interfaces.IMetrics``; with no metrics listener they get ``NoMetrics``,
whose calls do nothing.

Series (all prefixed ``mailstack_``; counters gain ``_total``):

- ``messages_accepted_total{listener}``: messages answered 250 after DATA
  (``listener``: smtp, submission, submissions).
- ``messages_refused_total{reason}``: refused commands and messages, one per
  refusal, by ``REASONS`` (anything else counts as ``other``).
- ``messages_delivered_total{agent}``, ``messages_deferred_total{agent}``,
  ``messages_bounced_total{agent}``: per recipient, ``agent`` local or remote.
- ``queue_entries`` and ``queue_oldest_age_seconds``: gauges computed when
  scraped from the function given to ``watch_queue`` (no per-message update).
- ``sessions_open{protocol}``: smtp and pop3 connections now open.
- ``tls_sessions_total{version}``: TLS handshakes completed, by protocol version.
- ``auth_failures_total{protocol}``: failed SMTP AUTH and POP3 logins.
- ``delivery_latency_seconds{agent}``: histogram, from the 250 to the delivery.
- ``dns_lookup_seconds``: histogram of the DNS lookups the server makes.

With several processes (``[server] processes``) each session worker counts
in its own ``Metrics``; the master's ``/metrics`` asks every worker for its
exposition over AMP (``add_source``) and serves the sum (``merge``): counters,
histograms and gauges add up, ``_created`` timestamps take the earliest.

The hot-path calls are counter increments on label children bound once in
the constructor (a dict lookup and a locked add).  Rendering happens in the
reactor thread at scrape time; a few hundred series take well under a
millisecond.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure
from twisted.web import http, pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from mailstack.interfaces import IMetrics

PREFIX = "mailstack"

LISTENERS = ("smtp", "submission", "submissions")
REASONS = (
    "relay",
    "unknown_user",
    "size",
    "rate",
    "auth",
    "dnsbl",
    "dmarc",
    "spf",
    "greylist",
    "spam",
    "loop",
    "other",
)
AGENTS = ("local", "remote")
PROTOCOLS = ("smtp", "pop3")

# From a local fsync-and-rename (milliseconds) to the last retries of a
# five-day queue lifetime.
DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)
DNS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class QueueStats(NamedTuple):
    """What ``watch_queue``'s function returns at each scrape."""

    entries: int
    oldest_age: float  # seconds; 0 when the queue is empty


class _QueueCollector(Collector):
    """Both queue gauges from one call of the queue's function, at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], QueueStats] | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self.source() if self.source is not None else QueueStats(0, 0.0)
        yield GaugeMetricFamily(f"{PREFIX}_queue_entries", "Entries in the outbound queue.", value=stats.entries)
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_oldest_age_seconds", "Age of the oldest queue entry.", value=stats.oldest_age
        )

    def describe(self) -> Iterable[Metric]:
        # Without describe() the registry would call collect() at registration.
        return [
            GaugeMetricFamily(f"{PREFIX}_queue_entries", "Entries in the outbound queue."),
            GaugeMetricFamily(f"{PREFIX}_queue_oldest_age_seconds", "Age of the oldest queue entry."),
        ]


@implementer(IMetrics)
class Metrics:
    """The server's metrics in their own registry; see the module docstring."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, doc: str, label: str, values: Iterable[str]) -> dict[str, Any]:
            metric = Counter(f"{PREFIX}_{name}", doc, [label], registry=self.registry)
            return {v: metric.labels(v) for v in values}

        self._accepted = counter("messages_accepted", "Messages accepted (250 after DATA).", "listener", LISTENERS)
        self._refused = counter("messages_refused", "Commands or messages refused, by reason.", "reason", REASONS)
        self._delivered = counter("messages_delivered", "Recipients delivered.", "agent", AGENTS)
        self._deferred = counter("messages_deferred", "Recipients deferred for a retry.", "agent", AGENTS)
        self._bounced = counter("messages_bounced", "Recipients failed for good (bounced).", "agent", AGENTS)
        self._auth_failures = counter("auth_failures", "Failed logins.", "protocol", PROTOCOLS)
        sessions = Gauge(f"{PREFIX}_sessions_open", "Connections open.", ["protocol"], registry=self.registry)
        self._sessions = {p: sessions.labels(p) for p in PROTOCOLS}
        self._tls = Counter(
            f"{PREFIX}_tls_sessions", "TLS handshakes, by version.", ["version"], registry=self.registry
        )
        self._tls_versions: dict[str, Any] = {}
        latency = Histogram(
            f"{PREFIX}_delivery_latency_seconds",
            "Time from acceptance to delivery.",
            ["agent"],
            buckets=DELIVERY_BUCKETS,
            registry=self.registry,
        )
        self._latency = {a: latency.labels(a) for a in AGENTS}
        self._dns = Histogram(
            f"{PREFIX}_dns_lookup_seconds", "DNS lookup time.", buckets=DNS_BUCKETS, registry=self.registry
        )
        self._queue = _QueueCollector()
        self.registry.register(self._queue)
        self.sources: list[Callable[[], Deferred[list[bytes]]]] = []

    def add_source(self, source: Callable[[], Deferred[list[bytes]]]) -> None:
        """Add the expositions ``source()`` fires with (the workers') to every scrape."""
        self.sources.append(source)

    def gather(self) -> Deferred[bytes]:
        """Our exposition plus those of the sources, summed (``merge``)."""
        own = self.exposition()
        asked = gatherResults([source() for source in self.sources])
        return asked.addCallback(lambda lists: merge([own, *(text for texts in lists for text in texts)]))

    def watch_queue(self, stats: Callable[[], QueueStats]) -> None:
        self._queue.source = stats

    def accepted(self, listener: str) -> None:
        self._accepted[listener].inc()

    def refused(self, reason: str) -> None:
        (self._refused.get(reason) or self._refused["other"]).inc()

    def delivered(self, agent: str, latency: float) -> None:
        self._delivered[agent].inc()
        self._latency[agent].observe(latency)

    def deferred(self, agent: str) -> None:
        self._deferred[agent].inc()

    def bounced(self, agent: str) -> None:
        self._bounced[agent].inc()

    def session_opened(self, protocol: str) -> None:
        self._sessions[protocol].inc()

    def session_closed(self, protocol: str) -> None:
        self._sessions[protocol].dec()

    def tls_established(self, version: str) -> None:
        child = self._tls_versions.get(version)
        if child is None:
            # Versions come from OpenSSL (``TLSv1.3``), a handful at most.
            child = self._tls_versions[version] = self._tls.labels(version)
        child.inc()

    def auth_failed(self, protocol: str) -> None:
        self._auth_failures[protocol].inc()

    def dns_lookup(self, seconds: float) -> None:
        self._dns.observe(seconds)

    def exposition(self) -> bytes:
        """Every series in the Prometheus text format."""
        return generate_latest(self.registry)


@implementer(IMetrics)
class NoMetrics:
    """``IMetrics`` when ``listen.metrics`` is empty: every call does nothing."""

    def watch_queue(self, stats: Callable[[], QueueStats]) -> None:
        pass

    def accepted(self, listener: str) -> None:
        pass

    def refused(self, reason: str) -> None:
        pass

    def delivered(self, agent: str, latency: float) -> None:
        pass

    def deferred(self, agent: str) -> None:
        pass

    def bounced(self, agent: str) -> None:
        pass

    def session_opened(self, protocol: str) -> None:
        pass

    def session_closed(self, protocol: str) -> None:
        pass

    def tls_established(self, version: str) -> None:
        pass

    def auth_failed(self, protocol: str) -> None:
        pass

    def dns_lookup(self, seconds: float) -> None:
        pass

    def exposition(self) -> bytes:
        return b""


class MetricsResource(Resource):
    """``GET /metrics``: the exposition of one ``Metrics``."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        if not self.metrics.sources:
            return self.metrics.exposition()

        def done(body: bytes) -> None:
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            request.setResponseCode(http.INTERNAL_SERVER_ERROR)
            request.finish()

        self.metrics.gather().addCallbacks(done, failed)
        return NOT_DONE_YET


class _Root(Resource):
    """``/metrics`` and a plain 404 for every other path."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return pages.notFound()


class MetricsSite(Site):
    """The HTTP site: ``/metrics`` only (anything else is 404), no access log
    (a scrape every few seconds would fill the mail log).

    The factory for each ``listen.metrics`` endpoint string: the service tree
    listens on them like on the mail listeners (``ssl:`` included).
    """

    def __init__(self, metrics: Metrics) -> None:
        root = _Root()
        root.putChild(b"metrics", MetricsResource(metrics))
        super().__init__(root)
        self.noisy = False

    def log(self, request: http.Request) -> None:
        pass


def merge(expositions: Iterable[bytes]) -> bytes:
    """Several expositions of the same series as one: values added, ``_created`` the earliest."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = defaultdict(dict)
    for text in expositions:
        for family in text_string_to_metric_families(text.decode("utf-8")):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            table = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in table:
                    table[key] = sample.value
                elif family.name.endswith("_created"):
                    table[key] = min(table[key], sample.value)
                else:
                    table[key] += sample.value
    for name, family in families.items():
        family.samples = [Sample(sample, dict(labels), value) for (sample, labels), value in values[name].items()]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    """Metric families already computed (``merge``)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def make_metrics(descriptions: list[str]) -> Metrics | NoMetrics:
    """``Metrics`` when there is a metrics listener, else ``NoMetrics``."""
    return Metrics() if descriptions else NoMetrics()
