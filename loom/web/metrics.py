"""GET /metrics: Loom's figures in the Prometheus text format (prometheus_client).

The hot paths only bump plain integers (bytes in and out, errors); this
collector reads them when Prometheus scrapes, so serving a million
deliveries a second costs nothing extra.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class LoomCollector:
    def __init__(self, app):
        self._app = app

    def collect(self):
        app, store = self._app, self._app.store
        yield GaugeMetricFamily("loom_streams_live", "Streams whose producer is connected.",
                                value=len(store.live_streams()))
        yield GaugeMetricFamily("loom_streams", "Streams in the catalog.",
                                value=app.stream_count)
        yield CounterMetricFamily("loom_bytes_in", "Bytes stored from producers.",
                                  value=store.bytes_in)
        yield CounterMetricFamily("loom_bytes_out", "Bytes sent to readers (streams and /spy).",
                                  value=app.site_counters.bytes_out)
        yield GaugeMetricFamily("loom_followers", "Readers of streams being served now.",
                                value=app.followers)
        yield GaugeMetricFamily("loom_spy_clients", "/spy clients connected now.",
                                value=app.spies)
        errors = CounterMetricFamily("loom_errors", "Errors, by kind.", labels=["kind"])
        for kind, count in sorted({**store.errors, **app.errors}.items()):
            errors.add_metric([kind], count)
        yield errors


def metrics_registry(app) -> tuple[CollectorRegistry, Histogram]:
    """A registry of Loom's own (not the process-global one), and the fsync histogram."""
    registry = CollectorRegistry()
    registry.register(LoomCollector(app))
    fsync = Histogram(
        "loom_fsync_seconds", "How long syncing stream data to disk took.",
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        registry=registry,
    )
    return registry, fsync
