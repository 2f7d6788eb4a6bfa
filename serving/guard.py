"""Admission control for the public routes: a per-client request rate limit and a cap on requests in flight.

Both answer 429 at once, with ``Retry-After`` and the usual ``{"error": {"code", "message"}}`` body, before the
request body is read, so that load beyond capacity costs almost nothing instead of queueing until every request
times out. This is a plain ASGI middleware on the mounted Starlette app only: BentoML's own routes (``/infer``,
``/metrics``, the health probes) never pass through it, which is why BentoML's ``traffic.max_concurrency`` is not
used (the service's in-process calls to ``/infer`` would count against it). Limits hold per worker process.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import JSONResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`; one token per request."""

    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.updated = rate, burst, burst, now

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one will be available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """One token bucket per client key, the least recently seen dropped beyond `max_clients` (bounded memory)."""

    def __init__(self, rate: float, burst: float | None = None, max_clients: int = 10_000) -> None:
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def wait_time(self, client: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        return bucket.take(now)


def too_many(code: str, message: str, retry_after_s: float) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=429,
        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )


class AdmissionGuard:
    """ASGI middleware: rate limit per client address (0 = off), then at most `max_in_flight` requests (0 = off)."""

    def __init__(self, app: ASGIApp, *, max_in_flight: int, rate_limit_rps: float) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.limiter = RateLimiter(rate_limit_rps) if rate_limit_rps > 0 else None
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.limiter is not None:
            client = scope.get("client")
            wait = self.limiter.wait_time(client[0] if client else "unknown")
            if wait > 0:
                message = f"over the limit of {self.limiter.rate:g} requests per second per client; slow down"
                await too_many("rate_limited", message, wait)(scope, receive, send)
                return
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            message = f"the server is at capacity ({self.max_in_flight} requests in progress); retry shortly"
            await too_many("over_capacity", message, 1.0)(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
