"""``GET /metrics`` in Prometheus' text format: requests, tokens, latency, queues, downloads.

One `NodeMetrics` per app, with its own registry (never prometheus-client's global one), so two
apps in one process (tests, benchmarks) count apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..progress import FINAL_STAGES, ProgressEvent
from .pool import ModelPool, PoolObserver, SlotState

if TYPE_CHECKING:
    from ..engine import Engine

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_NO_MODEL = "-"


class NodeMetrics(PoolObserver):
    """The node's counters and histograms; the pool reports downloads and resolves to it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmlb_requests",
            "HTTP requests by model, route and status",
            ["model", "route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llmlb_prompt_tokens",
            "Prompt tokens processed (answers that report usage)",
            ["model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "llmlb_completion_tokens", "Tokens generated", ["model"], registry=r
        )
        self.ttft = Histogram(
            "llmlb_time_to_first_token_seconds",
            "Streaming requests: from arrival to the first generated chunk (waits included)",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "llmlb_request_duration_seconds",
            "From arrival to the end of the response",
            ["model", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.downloaded = Counter(
            "llmlb_downloaded_bytes", "Model bytes downloaded, by source", ["source"], registry=r
        )
        self.resolves = Counter(
            "llmlb_resolves",
            "Resolves by outcome: local, downloaded, failed",
            ["outcome"],
            registry=r,
        )
        self._pool: ModelPool | None = None
        self._seen: dict[tuple[str, str, str], int] = {}
        self._lock = threading.Lock()
        r.register(_PoolCollector(self))

    def watch(self, pool: ModelPool) -> None:
        """Report `pool`'s queues and models, and receive its download events."""
        self._pool = pool
        pool.observer = self

    # -- what the pool reports (any thread) -------------------------------------------------
    def progress(self, event: ProgressEvent) -> None:
        if event.stage in FINAL_STAGES:
            with self._lock:
                for key in [k for k in self._seen if k[0] == event.model_id]:
                    del self._seen[key]
            return
        if event.stage != "downloading" or not event.source or not event.filename:
            return
        key = (event.model_id, event.filename, event.source)
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:  # a resumed partial's bytes were downloaded before: not now
                seen = event.downloaded + self._partial_bytes(event)
            if event.downloaded > seen:
                self.downloaded.labels(event.source).inc(event.downloaded - seen)
                seen = event.downloaded
            self._seen[key] = seen

    def resolved(self, model_id: str, outcome: str) -> None:
        self.resolves.labels(outcome).inc()

    def _partial_bytes(self, event: ProgressEvent) -> int:
        if self._pool is None or event.filename is None:
            return 0
        try:
            return self._pool.resolver.store.partial_bytes(event.model_id, event.filename)
        except (OSError, ValueError):
            return 0

    # -- what the middleware reports --------------------------------------------------------
    def observe(self, record: RequestRecord) -> None:
        model = record.model
        self.requests.labels(model, record.route, str(record.status)).inc()
        self.latency.labels(model, record.route).observe(record.seconds)
        if record.ttft is not None:
            self.ttft.labels(model).observe(record.ttft)
        if isinstance(record.prompt_tokens, int):
            self.prompt_tokens.labels(model).inc(record.prompt_tokens)
        if isinstance(record.completion_tokens, int):
            self.completion_tokens.labels(model).inc(record.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PoolCollector:
    """Gauges read from the pool at scrape time: queue depth, active requests, loaded models."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration; the pool may not exist yet

    def collect(self) -> Iterable[Metric]:
        queued = GaugeMetricFamily(
            "llmlb_queue_depth", "Requests waiting for a model (load or turn)", labels=["model"]
        )
        active = GaugeMetricFamily(
            "llmlb_active_requests", "Requests holding a model's turn", labels=["model"]
        )
        loaded = GaugeMetricFamily("llmlb_loaded_models", "Model contexts loaded now")
        pool = self.metrics._pool
        infos = pool.snapshot() if pool is not None else []
        per_model: dict[str, list[int]] = {}
        for info in infos:
            counts = per_model.setdefault(info.model_id, [0, 0])
            counts[0] += info.queued
            counts[1] += info.active
        for model_id, (q, a) in sorted(per_model.items()):
            queued.add_metric([model_id], q)
            active.add_metric([model_id], a)
        loaded.add_metric([], sum(1 for i in infos if i.state is SlotState.READY))
        engines = pool.engines() if pool is not None else {}
        return [queued, active, loaded, *_engine_metrics(engines)]


# name, help, the StepStats field: counted by each loaded model's engine (since its load).
_ENGINE_COUNTERS = (
    ("llmlb_engine_steps", "Engine steps (one llama_decode each)", "steps"),
    ("llmlb_engine_decoded_tokens", "Generated tokens fed back, one per sequence per step",
     "decoded_tokens"),
    ("llmlb_engine_prompt_tokens", "Prompt tokens evaluated (reused ones not counted)",
     "prompt_tokens"),
    ("llmlb_engine_reused_tokens", "Prompt tokens found in a free sequence's cells",
     "reused_tokens"),
)  # fmt: skip


def _engine_metrics(engines: dict[str, Engine]) -> list[Metric]:
    families = []
    for name, text, attr in _ENGINE_COUNTERS:
        family = CounterMetricFamily(name, text + " since the model loaded", labels=["model"])
        for model_id, engine in sorted(engines.items()):
            family.add_metric([model_id], getattr(engine.stats, attr))
        families.append(family)
    return families


class RequestRecord:
    """What one finished request contributes to the metrics."""

    def __init__(self, scope: Scope, route: str, status: int, seconds: float) -> None:
        state = scope.get("state") or {}
        # An id the node refused (400, 404) is whatever a client typed: no label for it.
        model = state.get("model")
        self.model = model if isinstance(model, str) and status not in (400, 404) else _NO_MODEL
        self.route = route
        self.status = status
        self.seconds = seconds
        self.ttft: float | None = None
        self.prompt_tokens = state.get("prompt_tokens")
        # Embeddings generate nothing: their "tokens" (for the access log) are all input.
        self.completion_tokens = None if route == "/v1/embeddings" else state.get("tokens")


class RequestMetrics:
    """Middleware: counts each request by model, route and status, times it and its first
    streamed token."""

    def __init__(self, app: ASGIApp, metrics: NodeMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        streaming = False
        first: float | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status, streaming, first
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers") or [])
                streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif streaming and first is None and message.get("body", b"").startswith(b"data: {"):
                first = time.perf_counter()  # SSE comments (": downloading 45%") are not tokens
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            record = RequestRecord(
                scope, self._route(scope), status or 499, time.perf_counter() - started
            )
            if first is not None:
                record.ttft = first - started
            self.metrics.observe(record)

    def _route(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return str(getattr(route, "path", "other"))
        return "other"  # unknown paths share one label: a scanner cannot grow the series


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus' text format."""
    node_metrics: NodeMetrics = request.state.metrics
    return Response(node_metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
