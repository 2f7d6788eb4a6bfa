"""Bounded `endpoint` labels for BentoML's request metrics.

BentoML 1.4's RunnerTrafficMetricsMiddleware labels `bentoml_service_request_*` with the raw request path, so
every distinct path a client sends (`/x1`, `/x2`, `/<random>/predict`, …) creates about twenty new Prometheus
series that live until the process exits. Measured here: after 22 000 random paths the worker held 1.1 GB
(0.25 GB fresh) and `/metrics` was 68 MB, 30–50 s to render. This patch gives the middleware a bounded label
instead (the path itself for known routes and loaded models, else a placeholder such as `/{unknown}/predict` or
`/{unmatched}`) and restores the real path before routing, so nothing else changes. See docs/reliability.md.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("bentoml.imageai")

PUBLIC_ACTIONS = ("predict", "proba", "predict/batch", "proba/batch", "explain", "reconstruct", "encode")
STATIC_PATHS = frozenset(
    {"/", "/docs.json", "/schema.json", "/livez", "/healthz", "/readyz", "/metrics", "/infer", "/models"}
    | {"/openapi-public.json", "/ui", "/v2", "/v2/health/live", "/v2/health/ready"}
)
_PUBLIC = re.compile(rf"/([^/]+)/({'|'.join(PUBLIC_ACTIONS)})")
_V2_MODEL = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?(/ready|/config|/infer)?")
_ORIGINAL_PATH = "imageai.original_path"


def endpoint_label(path: str, known_model: Callable[[str, str], bool]) -> str:
    """The metrics label for a request path: one of a bounded set of strings."""
    if path in STATIC_PATHS:
        return path
    if match := _PUBLIC.fullmatch(path):
        name, action = match.groups()
        return path if known_model(name, action) else f"/{{unknown}}/{action}"
    if match := _V2_MODEL.fullmatch(path):  # the version is left out: clients may send any string there
        name, action = match.groups()
        return f"/v2/models/{name if known_model(name, 'predict') else '{unknown}'}{action or ''}"
    for prefix in ("/static_content/", "/assets/"):
        if path.startswith(prefix):
            return prefix + "*"
    return "/{unmatched}"


class _RestorePath:
    """Put the real path back under the metrics middleware, before anything routes on it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if _ORIGINAL_PATH in scope:
            scope = {**scope, "path": scope[_ORIGINAL_PATH]}
            del scope[_ORIGINAL_PATH]
        await self.app(scope, receive, send)


def install(known_model: Callable[[str, str], bool]) -> bool:
    """Patch BentoML's metrics middleware class (before the server app is built). False if it has changed shape."""
    try:
        from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as middleware
    except ImportError:
        logger.warning("BentoML's RunnerTrafficMetricsMiddleware is gone; metrics labels are unbounded")
        return False
    if getattr(middleware, "_imageai_patched", False):
        return True
    original_init, original_call = middleware.__init__, middleware.__call__

    def __init__(self: Any, app: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, _RestorePath(app), *args, **kwargs)

    async def __call__(self: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            label = endpoint_label(scope["path"], known_model)
            if label != scope["path"]:
                scope = {**scope, "path": label, _ORIGINAL_PATH: scope["path"]}
        await original_call(self, scope, receive, send)

    middleware.__init__ = __init__
    middleware.__call__ = __call__
    middleware._imageai_patched = True
    return True
