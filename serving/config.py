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


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset/cpusets, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models_dir: Path = REPO_ROOT / "models"
    # name -> version to serve instead of the highest one, e.g. "chest_xray=2,mnist_autoencoder=1"
    model_versions: dict[str, str] = Field(default_factory=dict)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(default=1, ge=1)
    # 0 = share the cores between the workers: cores // workers threads each
    intra_op_threads: int = Field(default=0, ge=0)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    # auto: serve a model's int8 file when its card marks it served (within 1 accuracy point of fp32, faster)
    int8: Literal["auto", "off"] = "auto"
    # direct: in-process batcher (serving.batching.Batcher); bentoml: self.to_async through BentoML's dispatcher
    batching: Literal["direct", "bentoml"] = "direct"
    max_batch_size: int = Field(default=32, ge=2)
    max_latency_ms: int = Field(default=500, ge=10)
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0)
    readiness: Literal["strict", "lenient"] = "strict"
    request_timeout_s: int = Field(default=60, gt=0)
    # admission control on the public routes, per worker (serving.guard): 429 beyond these; 0 turns one off
    max_in_flight: int = Field(default=64, ge=0)
    rate_limit_rps: float = Field(default=200.0, ge=0)

    @field_validator("model_versions", mode="before")
    @classmethod
    def _parse_versions(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pins: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, sep, version = item.partition("=")
            if not sep or not name.strip() or not version.strip().isdigit():
                raise ValueError(f"expected name=version pairs separated by commas, got {item!r}")
            pins[name.strip()] = version.strip()
        return pins

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
    def warmup_batch_sizes(self) -> list[int]:
        """1, 2, 4, ... up to max_batch_size (included)."""
        sizes = [1]
        while sizes[-1] * 2 < self.max_batch_size:
            sizes.append(sizes[-1] * 2)
        return [*sizes, self.max_batch_size]
