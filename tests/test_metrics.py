"""Tests for mailstack.metrics: the series, the queue gauges, the HTTP resource."""

import json
import os
import re

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack import metrics
from mailstack.interfaces import IMetrics


def samples(text):
    """{(sample name, frozenset of labels): value} of a text exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class MetricsTests(SynchronousTestCase):
    def setUp(self):
        self.m = metrics.Metrics()

    def scrape(self):
        return samples(self.m.exposition().decode("utf-8"))

    def test_provides(self):
        """Both implementations provide IMetrics."""
        verifyObject(IMetrics, self.m)
        verifyObject(IMetrics, metrics.NoMetrics())

    def test_countersByLabel(self):
        """Accepted, refused, delivered, deferred and bounced count per label value."""
        self.m.accepted("submission")
        self.m.accepted("submission")
        self.m.refused("relay")
        self.m.refused("no-such-reason")
        self.m.delivered("local", 0.02)
        self.m.deferred("remote")
        self.m.bounced("remote")
        s = self.scrape()
        self.assertEqual(s[("mailstack_messages_accepted_total", frozenset({("listener", "submission")}))], 2)
        self.assertEqual(s[("mailstack_messages_accepted_total", frozenset({("listener", "smtp")}))], 0)
        self.assertEqual(s[("mailstack_messages_refused_total", frozenset({("reason", "relay")}))], 1)
        self.assertEqual(s[("mailstack_messages_refused_total", frozenset({("reason", "other")}))], 1)
        self.assertEqual(s[("mailstack_messages_delivered_total", frozenset({("agent", "local")}))], 1)
        self.assertEqual(s[("mailstack_messages_deferred_total", frozenset({("agent", "remote")}))], 1)
        self.assertEqual(s[("mailstack_messages_bounced_total", frozenset({("agent", "remote")}))], 1)

    def test_everyReasonPreBound(self):
        """Every refusal reason has a series from the start (rates need a zero)."""
        s = self.scrape()
        for reason in metrics.REASONS:
            self.assertEqual(s[("mailstack_messages_refused_total", frozenset({("reason", reason)}))], 0)

    def test_sessionsGauge(self):
        """Open sessions go up and down per protocol."""
        self.m.session_opened("smtp")
        self.m.session_opened("smtp")
        self.m.session_opened("pop3")
        self.m.session_closed("smtp")
        s = self.scrape()
        self.assertEqual(s[("mailstack_sessions_open", frozenset({("protocol", "smtp")}))], 1)
        self.assertEqual(s[("mailstack_sessions_open", frozenset({("protocol", "pop3")}))], 1)

    def test_tlsAuthDns(self):
        """TLS versions, login failures and DNS lookup times are recorded."""
        self.m.tls_established("TLSv1.3")
        self.m.tls_established("TLSv1.3")
        self.m.tls_established("TLSv1.2")
        self.m.auth_failed("pop3")
        self.m.dns_lookup(0.003)
        s = self.scrape()
        self.assertEqual(s[("mailstack_tls_sessions_total", frozenset({("version", "TLSv1.3")}))], 2)
        self.assertEqual(s[("mailstack_tls_sessions_total", frozenset({("version", "TLSv1.2")}))], 1)
        self.assertEqual(s[("mailstack_auth_failures_total", frozenset({("protocol", "pop3")}))], 1)
        self.assertEqual(s[("mailstack_dns_lookup_seconds_count", frozenset())], 1)
        self.assertEqual(s[("mailstack_dns_lookup_seconds_bucket", frozenset({("le", "0.005")}))], 1)
        self.assertEqual(s[("mailstack_dns_lookup_seconds_bucket", frozenset({("le", "0.001")}))], 0)

    def test_deliveryLatencyHistogram(self):
        """Delivery latency lands in the histogram of its agent."""
        self.m.delivered("remote", 42.0)
        s = self.scrape()
        self.assertEqual(s[("mailstack_delivery_latency_seconds_sum", frozenset({("agent", "remote")}))], 42.0)
        self.assertEqual(
            s[("mailstack_delivery_latency_seconds_bucket", frozenset({("agent", "remote"), ("le", "60.0")}))], 1
        )
        self.assertEqual(
            s[("mailstack_delivery_latency_seconds_bucket", frozenset({("agent", "remote"), ("le", "30.0")}))], 0
        )

    def test_queueGaugesAtScrape(self):
        """The queue gauges come from the watched function, called once per scrape."""
        calls = []

        def stats():
            calls.append(1)
            return metrics.QueueStats(entries=7, oldest_age=3600.5)

        self.assertEqual(self.scrape()[("mailstack_queue_entries", frozenset())], 0)
        self.m.watch_queue(stats)
        calls.clear()
        s = self.scrape()
        self.assertEqual(s[("mailstack_queue_entries", frozenset())], 7)
        self.assertEqual(s[("mailstack_queue_oldest_age_seconds", frozenset())], 3600.5)
        self.assertEqual(len(calls), 1)

    def test_ownRegistry(self):
        """Two Metrics objects do not share or collide in a registry."""
        other = metrics.Metrics()
        other.accepted("smtp")
        self.assertEqual(self.scrape()[("mailstack_messages_accepted_total", frozenset({("listener", "smtp")}))], 0)

    def test_makeMetrics(self):
        """No listener: the no-op implementation."""
        self.assertIsInstance(metrics.make_metrics([]), metrics.NoMetrics)
        self.assertIsInstance(metrics.make_metrics(["tcp:0"]), metrics.Metrics)


class HTTPTests(SynchronousTestCase):
    def get(self, site, path):
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        return head.decode("latin-1"), body

    def test_scrape(self):
        """GET /metrics answers 200 with the text format the Prometheus parser reads."""
        m = metrics.Metrics()
        m.accepted("smtp")
        head, body = self.get(metrics.MetricsSite(m), b"/metrics")
        self.assertTrue(head.startswith("HTTP/1.1 200"), head)
        self.assertIn("content-type: text/plain", head.lower())
        s = samples(body.decode("utf-8"))
        self.assertEqual(s[("mailstack_messages_accepted_total", frozenset({("listener", "smtp")}))], 1)

    def test_scrapeSumsTheSources(self):
        """With sources (the session workers), a scrape answers the sum of ours and theirs,
        once their Deferred fires; _created keeps the earliest time."""
        m, worker = metrics.Metrics(), metrics.Metrics()
        m.accepted("smtp")
        worker.accepted("smtp")
        worker.session_opened("smtp")
        worker.delivered("local", 0.2)
        pending = Deferred()
        m.add_source(lambda: pending)
        site = metrics.MetricsSite(m)
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /metrics HTTP/1.0\r\n\r\n")  # 1.0: the body is not chunked
        self.assertEqual(transport.value(), b"")
        pending.callback([worker.exposition(), metrics.NoMetrics().exposition()])
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.0 200"), head)
        s = samples(body.decode("utf-8"))
        self.assertEqual(s[("mailstack_messages_accepted_total", frozenset({("listener", "smtp")}))], 2)
        self.assertEqual(s[("mailstack_sessions_open", frozenset({("protocol", "smtp")}))], 1)
        self.assertEqual(s[("mailstack_delivery_latency_seconds_count", frozenset({("agent", "local")}))], 1)
        created = ("mailstack_messages_accepted_created", frozenset({("listener", "smtp")}))
        self.assertEqual(s[created], min(samples(x.exposition().decode())[created] for x in (m, worker)))

    def test_otherPaths404(self):
        """Only /metrics is served."""
        head, _ = self.get(metrics.MetricsSite(metrics.Metrics()), b"/")
        self.assertTrue(head.startswith("HTTP/1.1 404"), head)


class DashboardTests(SynchronousTestCase):
    def test_dashboardUsesExportedNames(self):
        """Every metric the Grafana dashboard queries is one the server exports."""
        path = os.path.join(os.path.dirname(__file__), "..", "etc", "grafana-mailstack.json")
        with open(path) as f:
            dashboard = json.load(f)
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        self.assertTrue(exprs)
        m = metrics.Metrics()
        m.delivered("local", 1)
        m.tls_established("TLSv1.3")
        exported = {s.name for f in text_string_to_metric_families(m.exposition().decode()) for s in f.samples}
        used = {name for e in exprs for name in re.findall(r"\bmailstack_[a-z_]+", e)}
        self.assertTrue(used)
        self.assertEqual(used - exported, set())
