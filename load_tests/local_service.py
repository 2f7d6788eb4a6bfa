"""The service as a child process on a free local port, for the load runners (run_load.py, soak.py, bench.py).

Rate limiting is off (the load comes from one address) and readiness is lenient unless asked otherwise (a degraded
model does not stop the others from being measured).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free local port below the kernel's ephemeral range.

    BentoML finds its internal ports (the process manager's control endpoint) by binding port 0, which may hand out
    the very port just found free here and released: the service then fails to start with "Address already in use"
    (seen in CI). Ports below the ephemeral range are never handed out that way.
    """
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    candidates = list(range(10_000, ephemeral_low))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no low port free: the kernel's choice
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_process(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`command` from the repository root in its own process group (stop() ends its children too), output in `log`."""
    with open(log, "wb") as output:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def start_service(
    models_dir: Path, port: int, log: Path, extra_env: dict[str, str], lenient: bool = True
) -> subprocess.Popen[bytes]:
    """`bentoml serve serving.service:ImageAI` in its own process group, its output in `log`; `lenient=False`
    leaves readiness to the environment (strict unless set there or in `extra_env`)."""
    env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "true",
        "IMAGEAI_MODELS_DIR": str(models_dir.resolve()),
        **({"IMAGEAI_READINESS": "lenient"} if lenient else {}),
        "IMAGEAI_RATE_LIMIT_RPS": "0",
        **extra_env,
    }
    command = [sys.executable, "-m", "bentoml", "serve", "serving.service:ImageAI"]
    return start_process([*command, "--host", "127.0.0.1", "--port", str(port)], env, log)


def wait_ready(
    url: str, process: subprocess.Popen, log: Path, timeout: float, consecutive: int = 4, name: str = "the service"
) -> None:
    """Until /readyz answers 200 `consecutive` times in a row (each worker answers for itself)."""
    deadline, streak = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with {process.returncode}:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                streak = streak + 1 if response.status == 200 else 0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            streak = 0
        if streak >= consecutive:
            return
        time.sleep(0.1 if streak else 0.3)
    raise SystemExit(f"{name} was not ready after {timeout:.0f} s:\n{log_tail(log)}")


def log_tail(log: Path, size: int = 3000) -> str:
    """The end of a child's log (decoding errors replaced: a crash may leave partial bytes)."""
    return log.read_text(errors="replace")[-size:]


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the whole process group (BentoML's workers too), SIGKILL if it does not end in time."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
