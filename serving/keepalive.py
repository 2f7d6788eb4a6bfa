"""Close each keep-alive connection after a number of responses, as nginx's ``keepalive_requests`` does.

BentoML's workers share one listening socket, and a keep-alive connection stays with the worker that accepted it
(upstream bentoml/BentoML#5426). A few long-lived client connections can so pile onto one worker and saturate its
core while another worker idles. Answering ``Connection: close`` every ``max_requests`` responses makes clients
reconnect now and then, and a reconnection is accepted by whichever worker gets to it first: usually the less
busy one. The cost is one TCP handshake per ``max_requests`` requests.
"""

from __future__ import annotations

from collections import OrderedDict

from serving.guard import ASGIApp, Message, Receive, Scope, Send

MAX_TRACKED_CONNECTIONS = 10_000  # bounded memory: connections closed by clients are forgotten oldest first


class ConnectionRecycler:
    """ASGI middleware: the ``max_requests``-th response on a connection carries ``Connection: close``."""

    def __init__(self, app: ASGIApp, *, max_requests: int) -> None:
        self.app = app
        self.max_requests = max_requests
        self._served: OrderedDict[tuple, int] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] != "http" or not self.max_requests or not client:
            await self.app(scope, receive, send)
            return
        connection = (*client, scope.get("http_version"))

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start" and self._count(connection) >= self.max_requests:
                del self._served[connection]
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive, send_counted)

    def _count(self, connection: tuple) -> int:
        served = self._served.pop(connection, 0) + 1
        self._served[connection] = served
        if len(self._served) > MAX_TRACKED_CONNECTIONS:
            self._served.popitem(last=False)
        return served
