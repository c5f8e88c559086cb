"""Prometheus metrics for /metrics, named like vLLM's with a `kvport:` prefix.

Engine gauges and counters are read from the engine's latest snapshot at scrape time (the
engine core sends one with every step), so scraping never talks to the engine. With several
replicas the snapshot is their sum (kvport.distributed.data_parallel.combine_snapshots), and
the `kvport:replica_*` families break health and load down per replica. Latencies are
measured here, in the API process, per request: what a client actually sees. Each app gets
its own CollectorRegistry so several apps (tests) never collide in the global one.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvport.core.request import RequestDelta

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                      0.75, 1.0, 2.5, 5.0, 10.0, 20.0)


class EngineCollector:
    """Gauges and counters from the engine's latest EngineSnapshot."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.labels = [model_name]

    def collect(self):
        snap = self.engine.snapshot
        hit_rate = snap.prefix_cache_hits / snap.prefix_cache_queries \
            if snap.prefix_cache_queries else 0.0
        yield self._gauge("num_requests_running", "Requests being generated.", snap.num_running)
        yield self._gauge("num_requests_waiting", "Requests waiting to be scheduled.",
                          snap.num_waiting)
        yield self._gauge("kv_cache_usage_perc",
                          "KV cache usage as a fraction of its blocks (1 = full).",
                          snap.kv_cache_usage)
        yield self._gauge("prefix_cache_hit_rate",
                          "Prefix cache hits / queries since start (0 when never queried).",
                          hit_rate)
        yield self._counter("prefix_cache_queries", "Prefix cache queries.",
                            snap.prefix_cache_queries)
        yield self._counter("prefix_cache_hits", "Prefix cache hits.", snap.prefix_cache_hits)
        yield self._counter("num_preemptions", "Requests preempted for KV cache space.",
                            snap.num_preemptions)
        yield self._counter("prompt_tokens", "Prompt tokens received.", snap.num_prompt_tokens)
        yield self._counter("generation_tokens", "Tokens generated.",
                            snap.num_generation_tokens)
        yield from self._replica_families()

    def _replica_families(self):
        """Per replica (one for a single engine): up or failed, load, requests moved away."""
        healthy = GaugeMetricFamily("kvport:replica_healthy",
                                    "1 while the engine replica serves, 0 once it has failed.",
                                    labels=["model_name", "replica"])
        outstanding = GaugeMetricFamily("kvport:replica_requests_outstanding",
                                        "Requests assigned to the replica that have not ended.",
                                        labels=["model_name", "replica"])
        assigned = CounterMetricFamily("kvport:replica_requests_assigned",
                                       "Requests the router assigned to the replica.",
                                       labels=["model_name", "replica"])
        rerouted = CounterMetricFamily("kvport:replica_requests_rerouted",
                                       "Requests moved to another replica after this one "
                                       "failed before their first token.",
                                       labels=["model_name", "replica"])
        for status in self.engine.replica_status():
            labels = self.labels + [str(status.index)]
            healthy.add_metric(labels, 1.0 if status.alive else 0.0)
            outstanding.add_metric(labels, status.outstanding)
            assigned.add_metric(labels, status.assigned)
            rerouted.add_metric(labels, status.rerouted)
        yield from (healthy, outstanding, assigned, rerouted)

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"kvport:{name}", doc, labels=["model_name"])
        family.add_metric(self.labels, value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(f"kvport:{name}", doc, labels=["model_name"])
        family.add_metric(self.labels, value)
        return family


class ServerMetrics:
    """The app's registry: engine state plus per-request latencies and outcomes."""

    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        labels, registry = ["model_name"], self.registry
        self.ttft = Histogram("kvport:time_to_first_token_seconds",
                              "Time from request arrival to its first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=registry).labels(model_name)
        self.tpot = Histogram("kvport:time_per_output_token_seconds",
                              "Time between consecutive output tokens of a request.", labels,
                              buckets=_TOKEN_GAP_BUCKETS, registry=registry).labels(model_name)
        self.e2e = Histogram("kvport:e2e_request_latency_seconds",
                             "Time from request arrival to its last token.", labels,
                             buckets=_LATENCY_BUCKETS, registry=registry).labels(model_name)
        self._finished = Counter("kvport:request_success",
                                 "Finished requests by finish reason (abort: client gone).",
                                 labels + ["finished_reason"], registry=registry)
        self.model_name = model_name

    def start_request(self) -> "RequestTimer":
        return RequestTimer(self)

    def count_finished(self, reason: str) -> None:
        self._finished.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Times one engine request from the API's side: first token, token gaps, end to end."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.start = time.perf_counter()
        self.last_token: float | None = None
        self.finish_reason: str | None = None

    def on_delta(self, delta: RequestDelta) -> None:
        now = time.perf_counter()
        for sample in delta.deltas:
            self.finish_reason = sample.finish_reason or self.finish_reason
        if not any(sample.token_ids for sample in delta.deltas):
            return
        if self.last_token is None:
            self.metrics.ttft.observe(now - self.start)
        else:   # one step's gap, even when n > 1 samples each got a token in it
            self.metrics.tpot.observe(now - self.last_token)
        self.last_token = now

    def finish(self, completed: bool) -> None:
        """Record the outcome; an unfinished request was aborted (client gone, error)."""
        self.metrics.e2e.observe(time.perf_counter() - self.start)
        self.metrics.count_finished(self.finish_reason if completed and self.finish_reason
                                    else "abort")
