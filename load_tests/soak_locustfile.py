"""Locust users for the soak run (driven by load_tests/soak.py; not meant to be run alone).

Every user sends a uniform mix over every route of every ready model (predict, proba and predict/batch with four
images for classifiers, reconstruct and encode for autoencoders) with generated images fitting each model's input.
Environment:
  SOAK_TARGETS     JSON list of {"path", "channels", "size", "images"}, from GET /models (written by soak.py)
  SOAK_USER_RPS    requests per second per user (0: as fast as possible, the saturation probe)
  SOAK_REPORT      where to write the per-minute JSON report: requests, failures by status, latency percentiles
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np
from locust import HttpUser, constant, constant_throughput, events, task
from locust.env import Environment
from sample_images import generated_images

TARGETS: list[dict[str, Any]] = json.loads(os.environ.get("SOAK_TARGETS", "[]"))
USER_RPS = float(os.environ.get("SOAK_USER_RPS", "0"))
REPORT = os.environ.get("SOAK_REPORT", "")

START = time.monotonic()
LATENCIES: dict[int, list[float]] = defaultdict(list)
FAILURES: dict[int, Counter[str]] = defaultdict(Counter)


UPLOADS = {target["path"]: generated_images(6, target["size"], target["channels"]) for target in TARGETS}


@events.request.add_listener
def _record(name: str, response_time: float, exception: BaseException | None, response: Any, **_: Any) -> None:
    minute = int((time.monotonic() - START) // 60)
    LATENCIES[minute].append(response_time)
    if exception is not None:
        status = getattr(response, "status_code", 0) or 0
        FAILURES[minute][str(status) if status else type(exception).__name__] += 1


@events.quitting.add_listener
def _write_report(environment: Environment, **_: Any) -> None:
    minutes = []
    for minute in sorted(LATENCIES):
        values = np.asarray(LATENCIES[minute])
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        minutes.append(
            {
                "minute": minute + 1,
                "requests": int(values.size),
                "failures": dict(FAILURES[minute]),
                "p50_ms": round(float(p50), 1),
                "p95_ms": round(float(p95), 1),
                "p99_ms": round(float(p99), 1),
                "max_ms": round(float(values.max()), 1),
            }
        )
    total = environment.stats.total
    summary = {
        "requests": total.num_requests,
        "failures": total.num_failures,
        "seconds": round(time.monotonic() - START, 1),
        "rps": round(total.num_requests / max(time.monotonic() - START, 1e-9), 2),
        "ok_rps": round((total.num_requests - total.num_failures) / max(time.monotonic() - START, 1e-9), 2),
        "p50_ms": total.get_response_time_percentile(0.5),
        "p95_ms": total.get_response_time_percentile(0.95),
        "p99_ms": total.get_response_time_percentile(0.99),
        "minutes": minutes,
    }
    if REPORT:
        with open(REPORT, "w") as output:
            json.dump(summary, output, indent=2)
    environment.process_exit_code = 0  # soak.py judges the run from the report


class SoakUser(HttpUser):
    wait_time = constant_throughput(USER_RPS) if USER_RPS > 0 else constant(0)

    @task
    def call(self) -> None:
        target = random.choice(TARGETS)
        path = target["path"]
        files = [("image", random.choice(UPLOADS[path])) for _ in range(target.get("images", 1))]
        with self.client.post(path, files=files, name=path, catch_response=True, timeout=60) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:120]}")
