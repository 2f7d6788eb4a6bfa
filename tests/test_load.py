"""The Locust load test runs headless (the one-command runner, which starts and stops the service itself, on
every test model's scenarios), and its gates really gate; the training benchmark runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BIN, REPO_ROOT, Server

from tests.synthetic import make_image_folder


def _locust(server: Server, seconds: int, **env: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(BIN / "locust"), "-f", "load_tests/locustfile.py", "--headless", "--only-summary",
        "-H", server.url, "-u", "4", "-r", "4", "-t", f"{seconds}s",
    ]  # fmt: skip
    environment = {**os.environ, "LOADTEST_MAX_P95_MS": "2000", **env}
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_load_runner_smoke_run_passes_its_gates(model_repository: Path) -> None:
    """`python load_tests/run_load.py` (make loadtest): service up, every ready model's routes, gates, service down."""
    command = [
        sys.executable, "load_tests/run_load.py", "--models-dir", str(model_repository), "--users", "4",
        "--duration", "4s", "--max-p95-ms", "2000", "--env", "IMAGEAI_WORKERS=1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "load test passed" in result.stderr
    routes = ("/chest_xray/predict", "/chest_xray/proba", "/chest_xray/predict/batch", "/rgb/predict", "/mnist/encode")
    for route in (*routes, "/mnist/reconstruct"):
        assert route in result.stdout + result.stderr  # Locust's summary table, one row per route


@pytest.mark.slow
def test_locust_gate_fails_the_run_on_errors(server: Server) -> None:
    result = _locust(server, 2, LOADTEST_MODEL="tampered")  # every request answers 503
    assert result.returncode != 0
    assert "load test FAILED" in result.stderr and "fail ratio 1.000" in result.stderr


@pytest.mark.slow
def test_training_benchmark_runs_both_pipelines(tmp_path: Path) -> None:
    """`load_tests/train_bench.py` on generated chest X-ray folders: both pipelines, both modes, one JSON."""
    data = make_image_folder(tmp_path / "data", ["NORMAL", "PNEUMONIA"], per_class=24, size=40)
    out = tmp_path / "train_bench.json"
    command = [
        sys.executable, "load_tests/train_bench.py", "--data", str(data), "--arch", "compact_cnn",
        "--batch-size", "8", "--batches", "1", "--data-batches", "2", "--warmup", "1", "--modes", "data,train,step",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {(r["pipeline"], r["mode"]): r for r in report["results"]}
    assert set(runs) == {(p, m) for p in ("ours", "naive") for m in ("data", "train", "step")}
    assert runs["ours", "train"]["channels_last"] and not runs["naive", "train"]["channels_last"]
    assert all(r["images_per_s"] > 0 for r in runs.values()) and set(report["ratios"]) == {"data", "train", "step"}


@pytest.mark.slow
def test_framework_floor_serves_the_no_op_route_three_ways(tmp_path: Path) -> None:
    """`load_tests/framework_floor.py`: bare uvicorn, BentoML as the service runs, and BentoML without access log."""
    out = tmp_path / "floor.json"
    command = [sys.executable, "load_tests/framework_floor.py", "--rounds", "1", "--seconds", "1", "--warmup", "0",
               "--count", "2", "--connections", "2", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"bare", "bentoml", "bentoml_quiet"}
    for [run] in report["runs"].values():
        assert run["requests_per_s"] > 0 and run["cpu_ms_per_request"] > 0 and run["errors"] == 0
    assert "BentoML's layers, as the service configures them" in result.stdout


def test_session_memory_compares_the_arena_on_and_off(model_repository: Path) -> None:
    command = [sys.executable, "load_tests/session_memory.py", str(model_repository / "rgb" / "1"),
               "--max-batch", "4", "--repeats", "1"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["on", "off"] and all("resident" in line for line in lines)


@pytest.mark.slow
def test_serving_benchmark_runs_every_part(model_repository: Path, tmp_path: Path) -> None:
    """`load_tests/bench.py` end to end on a test model, briefly: the limit, the service with one image and with
    several per request, both naive servers, half saturation, and the ratios in its JSON (needs Debian's wrk)."""
    out = tmp_path / "bench.json"
    command = [
        sys.executable, "load_tests/bench.py", "--models-dir", str(model_repository), "--model", "chest_xray",
        "--concurrency", "1,4", "--seconds", "1", "--warmup", "0", "--limit-seconds", "1", "--sweep-seconds", "0.3",
        "--batch-sizes", "1,8", "--images-per-request", "4", "--count", "8", "--half-connections", "4",
        "--env", "IMAGEAI_WORKERS=1", "--rounds", "1", "--out", str(out), "--markdown", str(tmp_path / "bench.md"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"service", "service_batch", "naive", "naive_tuned"}
    for runs in report["runs"].values():
        assert [run["concurrency"] for run in runs] == [1, 4]
        assert all(run["ok"] > 0 and run["errors"] == 0 for run in runs)
    assert {run["images_per_request"] for run in report["runs"]["service_batch"]} == {4}
    ratios = report["ratios"]
    for key in ("service_over_limit", "service_batch_over_limit", "p99_half_over_single"):
        assert ratios[key] > 0, key
    stages = report["half_saturation"]["service"]["stage_ms"]  # read from the service's /metrics
    assert stages["preprocess"] > 0 and stages["queue"] >= 0 and stages["inference"] > 0, stages
    assert "service at half saturation: mean" in result.stdout
    # the service's CPU per image by thread (the OS names serving.threads gives them), against the limit's
    cpu = report["half_saturation"]["service"]["cpu_ms_per_image"]
    assert cpu["event loop"] > 0 and cpu["decoding"] > 0 and cpu["inference"] > 0, cpu
    assert report["limit"]["cpu_ms_per_image"] > 0
    assert "service at its peak: CPU per image" in result.stdout
    [side_by_side] = report["side_by_side"]  # one round of every server, measured back to back
    assert {"limit_before", "service", "limit_after", "naive", "naive_tuned", "half_p99_ms"} <= side_by_side.keys()
    for key in ("service_over_limit", "service_over_naive", "service_over_naive_tuned", "p99_half_over_single"):
        assert ratios["side_by_side"][key]["median"] == side_by_side[key] > 0, key
    assert "Side by side" in (tmp_path / "bench.md").read_text()
