"""Serving settings, read once from IMAGEAI_* environment variables (the table is in serving/README.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from contract.preprocessing import DEFAULT_MAX_PIXELS

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIX = "IMAGEAI_"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota(cgroup: Path = CGROUP_ROOT) -> int | None:
    """Whole CPUs of the container's CPU quota (Kubernetes `limits.cpu`, `docker --cpus`), at least 1; None if unset.

    A quota does not shrink the CPU affinity: without this, a pod limited to 2 CPUs on a 64-core node would start
    onnxruntime threads for 64 cores and be throttled. cgroup v2 (`cpu.max`) first, then v1 (`cpu.cfs_quota_us`).
    """
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()  # v2: "200000 100000", or "max 100000"
    except (OSError, ValueError):
        try:
            quota, period = ((cgroup / "cpu" / name).read_text() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        except OSError:
            return None
    try:
        return None if quota.strip() in ("max", "-1") else max(1, int(quota) // int(period))
    except (ValueError, ZeroDivisionError):
        return None


def available_cores() -> int:
    """CPU cores this process may use: its CPU affinity (taskset, cpusets), capped by a container CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(cores, cpu_quota() or cores)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models_dir: Path = REPO_ROOT / "models"
    # name -> version to serve instead of the highest one, e.g. "chest_xray=2,mnist_autoencoder=1"
    model_versions: dict[str, str] = Field(default_factory=dict)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # 2 on the 2-core box measured in docs/performance.md: one single-threaded session per worker and core
    workers: int = Field(default=2, ge=1)
    # 0 = share the cores between the workers: cores // workers threads each
    intra_op_threads: int = Field(default=0, ge=0)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    # auto: serve a model's int8 file when its card marks it served (within 1 accuracy point of fp32, faster)
    int8: Literal["auto", "off"] = "auto"
    # onnxruntime's CPU arena keeps each session's largest-batch activations for the life of the worker: 1.7-2.5 GB
    # for emotion v4 (four Lite0 at 224 px) at batch 32, 0.4-0.5 GB without, for 0-25 % of its speed (performance.md)
    cpu_memory_arena: bool = False
    # direct: in-process batcher (serving.batching.Batcher); bentoml: self.to_async through BentoML's dispatcher
    batching: Literal["direct", "bentoml"] = "direct"
    max_batch_size: int = Field(default=32, ge=2)
    max_latency_ms: int = Field(default=500, ge=10)
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    # images in one /{model}/predict/batch or /proba/batch request (max_upload_bytes caps the whole body)
    max_images_per_request: int = Field(default=64, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0)
    readiness: Literal["strict", "lenient"] = "strict"
    request_timeout_s: int = Field(default=60, gt=0)
    # admission control on the public routes, per worker (serving.guard): 429 beyond these; 0 turns one off
    max_in_flight: int = Field(default=64, ge=0)
    rate_limit_rps: float = Field(default=200.0, ge=0)
    # answer Connection: close every this many responses on a keep-alive connection (serving.keepalive); 0 = never.
    # 100 spread few long-lived connections over both workers: +40-65% images/s at 4-32 (docs/performance.md)
    keepalive_max_requests: int = Field(default=100, ge=0)
    # while a worker has requests waiting, close one of its keep-alive connections at most every this many ms, so that
    # the client reconnects to the idle worker (serving.keepalive); 0 = never. 50: both cores busy at 4-32 connections
    # where they were not (1.45-1.74 cores), +8-29% images/s (docs/performance.md)
    keepalive_rebalance_ms: int = Field(default=50, ge=0)
    # OpenTelemetry traces, sent over OTLP/HTTP to this URL (a collector's, e.g. http://otel-collector:4318/v1/traces)
    # for this share of the requests; unset: no tracing at all (tracing_config)
    tracing_endpoint: str = ""
    tracing_sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    # BentoML's access log, a line per request (not the probes): off where an ingress already logs every request;
    # ≈ 0.04 ms of CPU per request (load_tests/framework_floor.py)
    access_log: bool = True

    @field_validator("model_versions", mode="before")
    @classmethod
    def _parse_versions(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pins: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, sep, version = item.partition("=")
            if not sep or not name.strip() or not version.strip().isdecimal():
                raise ValueError(f"expected name=version pairs separated by commas, got {item!r}")
            pins[name.strip()] = version.strip()
        return pins

    @field_validator("tracing_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s) URL such as http://otel-collector:4318/v1/traces, got {value!r}")
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from IMAGEAI_<FIELD> variables; unset or empty variables keep the default."""
        environ = os.environ if environ is None else environ
        values = {
            name: environ[key]
            for name in cls.model_fields
            if (key := ENV_PREFIX + name.upper()) in environ and environ[key].strip()
        }
        return cls.model_validate(values)

    @property
    def threads_per_session(self) -> int:
        """onnxruntime intra-op threads, so that workers x threads never exceeds the cores."""
        return self.intra_op_threads or max(1, available_cores() // self.workers)

    @property
    def batches_in_flight(self) -> int:
        """Batches each worker runs at once (IMAGEAI_BATCHING=direct): cores ÷ (workers x intra-op threads)."""
        return max(1, available_cores() // (self.workers * self.threads_per_session))

    @property
    def bentoml_options(self) -> dict[str, object]:
        """The `@bentoml.service` options (load_tests/framework_floor.py serves a no-op route with the same ones)."""
        return {
            "workers": self.workers,
            # no traffic.max_concurrency: the in-process /infer calls would count against it and get 429s
            "traffic": {"timeout": self.request_timeout_s},
            "tracing": self.tracing_config,
            # self.to_async talks to this very process. BentoML renews that client session every 100 requests by
            # default and closes the old one under in-flight calls, failing them; in-process it buys nothing.
            "runner_connection": {"max_requests": 2**31 - 1, "max_age": 1e9},
            # the internal /infer calls would double every access-log line and request metric; probes would flood it
            "logging": {
                "access": {
                    "enabled": self.access_log,
                    "skip_paths": [
                        "/metrics", "/healthz", "/livez", "/readyz", "/infer", "/v2/health/live", "/v2/health/ready"
                    ]
                }
            },
        }  # fmt: skip

    @property
    def tracing_config(self) -> dict[str, object]:
        """BentoML's `tracing` service configuration.

        BentoML runs OpenTelemetry's ASGI middleware on every request even with no exporter and its default sample
        rate of 0, when no trace is ever recorded: ≈ 0.3 ms of CPU per request, 3-15 % of the service's throughput
        on two cores (docs/performance.md). Without an endpoint every URL is excluded from it.
        """
        if not self.tracing_endpoint:
            return {"excluded_urls": [".*"]}
        return {
            "exporter_type": "otlp",
            "sample_rate": self.tracing_sample_rate,
            "otlp": {"protocol": "http", "endpoint": self.tracing_endpoint},
        }

    @property
    def warmup_batch_sizes(self) -> list[int]:
        """1, 2, 4, ... up to max_batch_size (included)."""
        sizes = [1]
        while sizes[-1] * 2 < self.max_batch_size:
            sizes.append(sizes[-1] * 2)
        return [*sizes, self.max_batch_size]
