"""Load test for the serving API: real image uploads to every model, gated on failures and p95 latency.

    python load_tests/run_load.py                  # starts the service, runs this headless, stops it (make loadtest)
    locust -f load_tests/locustfile.py --headless -H http://localhost:3000 -u 8 -r 8 -t 60s \
        --images data/samples --csv runs/load     # against a running service

Scenarios: the models come from GET /models at the start (every ready one, or those named by --model). Each user
picks a model and route at random per request: classifiers get predict, proba and predict/batch (four images) mixed
3 : 1 : 1, autoencoders reconstruct and encode 1 : 1 (MNIST through `/mnist/reconstruct`, the name users call).
Every answer is checked (JSON keys and ranges, or a PNG), and statistics are kept per model and route.

Options (each also an environment variable):
  --images DIR          LOADTEST_IMAGES          PNG/JPEG files to upload (default: generated grayscale PNGs)
  --model NAMES         LOADTEST_MODEL           comma-separated models to call (default: every ready model)
  --max-fail-ratio R    LOADTEST_MAX_FAIL_RATIO  largest tolerated share of failed requests (default 0.01)
  --max-p95-ms MS       LOADTEST_MAX_P95_MS      largest tolerated 95th-percentile latency (default 1000)
The process exits non-zero when a gate is exceeded, so CI can run it as is.
"""

from __future__ import annotations

import json
import logging
import random
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from locust import HttpUser, between, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from sample_images import folder_images, generated_images
from targets import ROUTES

logger = logging.getLogger("loadtest")

PREDICTION_KEYS = {"label", "confidence"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (file name, bytes, content type), read once: every request reuses the bytes, never an open file handle
IMAGES: list[tuple[str, bytes, str]] = []


@events.init_command_line_parser.add_listener
def _add_options(parser: LocustArgumentParser) -> None:
    parser.add_argument("--images", env_var="LOADTEST_IMAGES", default="", help="folder of PNG/JPEG images")
    parser.add_argument("--model", env_var="LOADTEST_MODEL", default="", help="models to call (default: all ready)")
    parser.add_argument("--max-fail-ratio", env_var="LOADTEST_MAX_FAIL_RATIO", type=float, default=0.01)
    parser.add_argument("--max-p95-ms", env_var="LOADTEST_MAX_P95_MS", type=float, default=1000.0)


@events.init.add_listener
def _load_images(environment: Environment, **_: object) -> None:
    folder = getattr(environment.parsed_options, "images", "")
    IMAGES[:] = folder_images(Path(folder)) if folder else generated_images()
    if not IMAGES:
        raise SystemExit(f"no PNG or JPEG images in {folder}")
    logger.info("uploading %d image(s) from %s", len(IMAGES), folder or "memory (generated)")


@dataclass(frozen=True)
class Target:
    """One route of one model, and how often a user picks it relative to the others."""

    model: str  # the name the card gives
    path: str
    route: str  # predict, proba, predict/batch, reconstruct, encode
    weight: int
    images: int = 1  # image parts per request


TARGETS: list[Target] = []


def targets_for(models: list[dict], wanted: list[str]) -> list[Target]:
    """Routes of the ready models (or of the named ones, ready or not: a test may aim at an unavailable one)."""
    by_name = {model["name"]: model for model in models}
    names = wanted or [model["name"] for model in models if model.get("status") == "ready"]
    targets = []
    for name in names:
        kind = (by_name.get(name, {}).get("card") or {}).get("kind", "classifier")
        # /mnist/reconstruct serves mnist_autoencoder
        public = name.removesuffix("_autoencoder") if kind == "autoencoder" else name
        targets += [Target(name, f"/{public}/{route}", route, weight, images) for route, weight, images in ROUTES[kind]]
    return targets


@events.test_start.add_listener
def _discover(environment: Environment, **_: object) -> None:
    wanted = [name.strip() for name in getattr(environment.parsed_options, "model", "").split(",") if name.strip()]
    try:
        with urllib.request.urlopen(f"{environment.host.rstrip('/')}/models", timeout=30) as response:
            models = json.load(response)["models"]
    except (OSError, ValueError, KeyError) as error:
        if not wanted:
            raise SystemExit(f"GET /models failed ({error}); name the models with --model") from None
        models = []
    TARGETS[:] = targets_for(models, wanted)
    if not TARGETS:
        raise SystemExit("no ready model to load")
    logger.info("load on %s", ", ".join(f"{t.path} (x{t.weight})" for t in TARGETS))


def check(target: Target, response) -> str | None:
    """Why the answer is wrong, or None."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    if target.route == "reconstruct":
        ok = response.headers.get("content-type", "").startswith("image/png") and response.content[:8] == PNG_MAGIC
        return None if ok else "the reconstruction is not a PNG"
    try:
        body = response.json()
    except ValueError:
        return "the response is not JSON"
    if body.get("model") != target.model or "version" not in body:
        return f"answered by model {body.get('model')!r} version {body.get('version')!r}"
    if target.route == "predict/batch":
        results = body.get("results") or []
        if len(results) != target.images:
            return f"{len(results)} results for {target.images} images"
        return next(filter(None, (_prediction_problem(result) for result in results)), None)
    if target.route == "predict":
        return _prediction_problem(body)
    if target.route == "proba":
        probabilities = body.get("probabilities") or {}
        total = sum(probabilities.values())
        return None if probabilities and abs(total - 1.0) < 1e-3 else f"probabilities sum to {total}"
    code = body.get("code")
    return None if isinstance(code, list) and code else "no code in the response"


def _prediction_problem(body: dict) -> str | None:
    missing = PREDICTION_KEYS - body.keys()
    if missing:
        return f"the response lacks {sorted(missing)}: {body}"
    return None if 0.0 <= body["confidence"] <= 1.0 else f"implausible prediction {body}"


class ImageUser(HttpUser):
    """Uploads an image to a random model route per request, weighted (per classifier predict 3 : proba 1 : four
    images to predict/batch 1)."""

    wait_time = between(0.0, 0.1)

    @task
    def call(self) -> None:
        target = random.choices(TARGETS, weights=[t.weight for t in TARGETS])[0]
        files = [("image", random.choice(IMAGES)) for _ in range(target.images)]
        with self.client.post(target.path, files=files, name=target.path, catch_response=True) as response:
            problem = check(target, response)
            if problem:
                response.failure(problem)
            else:
                response.success()


@events.quitting.add_listener
def _gate(environment: Environment, **_: object) -> None:
    """Fail the process when the failure ratio or the p95 latency is over its bound."""
    options = environment.parsed_options
    total = environment.stats.total
    p95 = total.get_response_time_percentile(0.95) or 0.0
    problems = []
    if total.num_requests == 0:
        problems.append("no request was made")
    if total.fail_ratio > options.max_fail_ratio:
        problems.append(f"fail ratio {total.fail_ratio:.3f} > {options.max_fail_ratio}")
    if p95 > options.max_p95_ms:
        problems.append(f"p95 {p95:.0f} ms > {options.max_p95_ms:.0f} ms")
    summary = f"{total.num_requests} requests, fail ratio {total.fail_ratio:.3f}, p95 {p95:.0f} ms"
    if problems:
        logger.error("load test FAILED (%s): %s", summary, "; ".join(problems))
        environment.process_exit_code = 1
    else:
        logger.info("load test passed: %s", summary)
        environment.process_exit_code = 0
