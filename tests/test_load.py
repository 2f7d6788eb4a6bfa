"""The Locust load test runs headless against the test server, and its gates really gate."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import BIN, REPO_ROOT, Server


def _locust(server: Server, seconds: int, **env: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(BIN / "locust"), "-f", "load_tests/locustfile.py", "--headless", "--only-summary",
        "-H", server.url, "-u", "4", "-r", "4", "-t", f"{seconds}s",
    ]  # fmt: skip
    environment = {**os.environ, "LOADTEST_MAX_P95_MS": "2000", **env}
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_locust_smoke_run_passes_its_gates(server: Server) -> None:
    result = _locust(server, 5)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "load test passed" in result.stderr


@pytest.mark.slow
def test_locust_gate_fails_the_run_on_errors(server: Server) -> None:
    result = _locust(server, 2, LOADTEST_MODEL="tampered")  # every request answers 503
    assert result.returncode != 0
    assert "load test FAILED" in result.stderr and "fail ratio 1.000" in result.stderr
