"""Close keep-alive connections now and then, so that they spread over BentoML's workers.

BentoML's workers share one listening socket, and a keep-alive connection stays with the worker that accepted it
(upstream bentoml/BentoML#5426). A few long-lived client connections can so pile onto one worker and saturate its
core while another worker idles. A response that carries ``Connection: close`` makes its client reconnect, and a
reconnection is accepted by whichever worker gets to it first: usually the idle one, which waits in ``epoll``
while the busy one is running Python. Two triggers:

- every ``max_requests``-th response of a connection, as nginx's ``keepalive_requests`` does;
- when this worker is queueing (more than ``BUSY_IN_FLIGHT`` requests in flight), one response at most every
  ``rebalance_interval_s``: the busy worker hands connections back quickly instead of after ``max_requests``.

The cost is one TCP handshake per closed connection.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from serving.guard import ASGIApp, Message, Receive, Scope, Send

MAX_TRACKED_CONNECTIONS = 10_000  # bounded memory: connections closed by clients are forgotten oldest first
BUSY_IN_FLIGHT = 2  # this request and more than one other: requests are waiting on this worker
MIN_SERVED_BEFORE_REBALANCE = 2  # a connection that has just moved is not moved again at once


class ConnectionRecycler:
    """ASGI middleware: ``Connection: close`` on a connection's ``max_requests``-th response, and on a busy worker."""

    def __init__(self, app: ASGIApp, *, max_requests: int, rebalance_interval_s: float = 0.0) -> None:
        self.app = app
        self.max_requests = max_requests
        self.rebalance_interval_s = rebalance_interval_s
        self.in_flight = 0
        self._last_rebalance = float("-inf")
        self._served: OrderedDict[tuple, int] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] != "http" or not (self.max_requests or self.rebalance_interval_s) or not client:
            await self.app(scope, receive, send)
            return
        connection = (*client, scope.get("http_version"))

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start" and self._should_close(connection):
                self._served.pop(connection, None)
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.in_flight -= 1

    def _should_close(self, connection: tuple) -> bool:
        served = self._count(connection)
        if self.max_requests and served >= self.max_requests:
            return True
        if not self.rebalance_interval_s or served < MIN_SERVED_BEFORE_REBALANCE or self.in_flight <= BUSY_IN_FLIGHT:
            return False
        now = time.monotonic()
        if now - self._last_rebalance < self.rebalance_interval_s:
            return False
        self._last_rebalance = now
        return True

    def _count(self, connection: tuple) -> int:
        served = self._served.pop(connection, 0) + 1
        self._served[connection] = served
        if len(self._served) > MAX_TRACKED_CONNECTIONS:
            self._served.popitem(last=False)
        return served
