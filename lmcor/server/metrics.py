"""`Metrics`: what a server exposes at /metrics, in its own Prometheus registry (one per app, so that
several apps in one process, as in tests, count apart)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from lmcor.runtime.request import Correction

# Seconds: a small corrector answers in milliseconds on a GPU and in tens of them on a CPU; a queue
# under load or a long beam search takes seconds.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENDPOINTS = ("correct", "classify", "generate")


class Metrics:
    """Counters and histograms the server feeds as it answers; the gauges are read when scraped.

    `pending(endpoint)` is the number of that endpoint's requests accepted and not yet answered;
    `running()` the corrector's rows decoding now, estimated as its pending requests up to the
    batch size (the engine publishes no live reading of its batch).
    """

    def __init__(self, pending: Callable[[str], int], running: Callable[[], int], in_flight: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = Counter("lmcor_http_requests", "HTTP requests answered, by route and status code",
                            ["route", "code"], registry=r)
        self.http_seconds = Histogram("lmcor_http_request_seconds", "HTTP requests from arrival to the last byte "
                                      "sent, by route", ["route"], buckets=_BUCKETS, registry=r)
        self.requests = Counter("lmcor_requests", "requests answered by a model (one per item of a list), by "
                                "endpoint; for corrections, outcome decoded, gated or fallback",
                                ["endpoint", "outcome"], registry=r)
        self.tokens = Counter("lmcor_tokens", "the corrector's tokens: input read, output written, drafted "
                              "(sent for verification) and accepted", ["kind"], registry=r)
        self.stages = Histogram("lmcor_correction_seconds", "where a decoded correction's time went: queue "
                                "(waiting for a row), encoder, decoder, first_token and total (submission to "
                                "last token)", ["stage"], buckets=_BUCKETS, registry=r)
        self.errors = Counter("lmcor_errors", "error answers, by kind", ["kind"], registry=r)
        depth = Gauge("lmcor_queue_depth", "requests accepted and not yet answered, by endpoint", ["endpoint"],
                      registry=r)
        for endpoint in ENDPOINTS:
            depth.labels(endpoint).set_function(lambda endpoint=endpoint: pending(endpoint))
        Gauge("lmcor_running_batch_size", "rows the corrector decodes now (estimate: its pending requests, up to "
              "the batch size)", registry=r).set_function(running)
        Gauge("lmcor_http_requests_in_flight", "HTTP requests being answered", registry=r).set_function(in_flight)

    def corrected(self, result: Correction) -> None:
        outcome = "gated" if result.gated else "fallback" if result.fallback else "decoded"
        self.requests.labels("correct", outcome).inc()
        if result.gated:  # not decoded: no tokens, no stage times
            return
        s = result.stats
        for kind, count in (("input", s.input_tokens), ("output", s.output_tokens), ("drafted", s.drafted_tokens),
                            ("accepted", s.accepted_tokens)):
            self.tokens.labels(kind).inc(count)
        for stage, seconds in (("queue", s.queued_s), ("encoder", s.encoder_s), ("decoder", s.decoder_s),
                               ("first_token", s.first_token_s), ("total", s.latency_s)):
            self.stages.labels(stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
