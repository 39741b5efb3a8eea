"""Prometheus metrics (one registry per app, so tests can build many apps in one process)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "cae_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "cae_http_request_duration_seconds",
            "Request latency by route.",
            ["route"],
            buckets=_LATENCY,
            registry=r,
        )
        self.rejections = Counter(
            "cae_rejections", "Requests refused, by reason (the error code).", ["reason"], registry=r
        )
        self.queue_wait = Histogram(
            "cae_queue_wait_seconds",
            "Time from queueing to the first inference.",
            ["task"],
            buckets=_LATENCY,
            registry=r,
        )
        self.inference = Histogram(
            "cae_inference_duration_seconds",
            "Backend time per batch.",
            ["task"],
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "cae_batch_size",
            "Images per inference call (batches actually formed).",
            ["task"],
            buckets=_BATCH,
            registry=r,
        )
        self.preprocess = Histogram(
            "cae_preprocess_duration_seconds",
            "Decode + preprocess time per image.",
            buckets=_LATENCY,
            registry=r,
        )
        self.images = Counter("cae_images", "Images accepted for inference, by task.", ["task"], registry=r)
        self.queue_rows = Gauge(
            "cae_queue_images", "Images waiting in the queue, by task.", ["task"], registry=r
        )
        self.ready = Gauge("cae_ready", "1 when the model is loaded, verified and warmed up.", registry=r)
        self.model = Info("cae_model", "The loaded model and runtime.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_label(scope: Scope) -> str:
    """The route template a request was served by: FastAPI sets ``scope["route"]`` for its own routes
    only, so plain Starlette routes (``/openapi.json``) are matched against the app's routes here; only
    requests no route matches (404s) are ``unmatched``, which keeps the label values bounded."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return str(path)
    for candidate in getattr(getattr(scope.get("app"), "router", None), "routes", ()):
        match, _ = candidate.matches(scope)
        if match is Match.FULL:
            return str(getattr(candidate, "path", None) or "unmatched")
    return "unmatched"


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        # labelled children cached by their label values: prometheus_client's labels() takes a lock and
        # builds a tuple per call, a measurable part of a small request's CPU (docs/performance.md)
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def _observe(self, route: str, method: str, status: str, seconds: float) -> None:
        key = (route, method, status)
        child = self._children.get(key)
        if child is None:
            child = (self.metrics.requests.labels(route, method, status), self.metrics.latency.labels(route))
            if len(self._children) < 4096:  # bounded: route templates x methods x statuses
                self._children[key] = child
        child[0].inc()
        child[1].observe(seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._observe(route_label(scope), scope["method"], str(status["code"]), time.perf_counter() - t0)
