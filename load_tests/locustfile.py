"""Load test for the serving API: real image uploads to /<model>/predict, gated on failures and p95 latency.

    locust -f load_tests/locustfile.py --headless -H http://localhost:3000 -u 16 -r 4 -t 60s \
        --images data/samples --csv runs/load

Options (each also an environment variable):
  --images DIR          LOADTEST_IMAGES          PNG/JPEG files to upload (default: generated grayscale PNGs)
  --model NAME          LOADTEST_MODEL           model to call (default chest_xray)
  --max-fail-ratio R    LOADTEST_MAX_FAIL_RATIO  largest tolerated share of failed requests (default 0.01)
  --max-p95-ms MS       LOADTEST_MAX_P95_MS      largest tolerated 95th-percentile latency (default 1000)
The process exits non-zero when a gate is exceeded, so CI can run it as is.
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
from locust import HttpUser, between, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from PIL import Image

logger = logging.getLogger("loadtest")

IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
PREDICTION_KEYS = {"model", "version", "label", "confidence"}

# (file name, bytes, content type), read once: every request reuses the bytes, never an open file handle
IMAGES: list[tuple[str, bytes, str]] = []


@events.init_command_line_parser.add_listener
def _add_options(parser: LocustArgumentParser) -> None:
    parser.add_argument("--images", env_var="LOADTEST_IMAGES", default="", help="folder of PNG/JPEG images")
    parser.add_argument("--model", env_var="LOADTEST_MODEL", default="chest_xray", help="model to call")
    parser.add_argument("--max-fail-ratio", env_var="LOADTEST_MAX_FAIL_RATIO", type=float, default=0.01)
    parser.add_argument("--max-p95-ms", env_var="LOADTEST_MAX_P95_MS", type=float, default=1000.0)


def generated_images(count: int = 8, size: int = 256) -> list[tuple[str, bytes, str]]:
    """Grayscale PNGs of smooth blobs plus noise: compressible like real scans, different from each other."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for index in range(count):
        cx, cy, width = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))
        pixels = np.clip(blob * 200 + rng.normal(0, 12, blob.shape) + 20, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append((f"generated_{index}.png", buffer.getvalue(), "image/png"))
    return images


def folder_images(folder: Path) -> list[tuple[str, bytes, str]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p.name, p.read_bytes(), IMAGE_SUFFIXES[p.suffix.lower()]) for p in files]


@events.init.add_listener
def _load_images(environment: Environment, **_: object) -> None:
    folder = getattr(environment.parsed_options, "images", "")
    IMAGES[:] = folder_images(Path(folder)) if folder else generated_images()
    if not IMAGES:
        raise SystemExit(f"no PNG or JPEG images in {folder}")
    logger.info("uploading %d image(s) from %s", len(IMAGES), folder or "memory (generated)")


class PredictUser(HttpUser):
    wait_time = between(0.0, 0.1)

    @task
    def predict(self) -> None:
        model = self.environment.parsed_options.model
        name, data, content_type = random.choice(IMAGES)
        with self.client.post(
            f"/{model}/predict",
            files={"image": (name, data, content_type)},
            name=f"/{model}/predict",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            try:
                body = response.json()
            except ValueError:
                response.failure("the response is not JSON")
                return
            missing = PREDICTION_KEYS - body.keys()
            if missing:
                response.failure(f"the response lacks {sorted(missing)}")
            elif body["model"] != model or not 0.0 <= body["confidence"] <= 1.0:
                response.failure(f"implausible prediction {body}")
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
