"""A route that reads a multipart upload and answers a prediction-sized JSON, doing no other work: what one request
costs the HTTP stack alone. load_tests/framework_floor.py serves it bare (``uvicorn noop_app:app``) and inside
BentoML with the service's own options (``bentoml serve noop_app:NoOp``, which reads the same IMAGEAI_* settings).
"""

from __future__ import annotations

import sys
from pathlib import Path

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.config import Settings  # noqa: E402

ANSWER = {"model": "chest_xray", "version": "3", "label": "NORMAL", "confidence": 0.98, "threshold": 0.636}


async def noop(request: Request) -> Response:
    async with request.form(max_files=1, max_fields=16) as form:
        await form["image"].read()
    return JSONResponse(ANSWER)


async def ready(_: Request) -> Response:
    return Response()  # bare uvicorn's readiness for local_service.wait_ready; BentoML answers its own /readyz


app = Starlette(routes=[Route("/noop", noop, methods=["POST"]), Route("/readyz", ready)])


@bentoml.service(name="noop", **(Settings.from_env().bentoml_options | {"workers": 1}))
@bentoml.asgi_app(app)
class NoOp:
    """Nothing but the mounted route."""
