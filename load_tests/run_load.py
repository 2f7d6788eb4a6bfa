"""The Locust load test in one command: start the service, run load_tests/locustfile.py headless, stop the service.

    python load_tests/run_load.py                                   # models/, 8 users, 60 s (also: make loadtest)
    python load_tests/run_load.py --users 16 --duration 5m --images ../shared/datasets/chest_xray/train/NORMAL \\
        --max-p95-ms 800 --csv runs/load

Starts ``bentoml serve serving.service:ImageAI`` on a free port with --models-dir, waits for /readyz, runs Locust
with the scenarios of every ready model (or --model), then stops the service and exits with Locust's status:
non-zero when the failure ratio or the p95 latency is over its gate. The per-client rate limit is off
(IMAGEAI_RATE_LIMIT_RPS=0: every simulated user comes from this one address); --env adds other settings.
Locust runs on the same machine and takes CPU from the server: this tests behaviour under load, the throughput
figures come from load_tests/bench.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from local_service import BIN, REPO_ROOT, free_port, start_service, stop, wait_ready

sys.path.insert(0, str(REPO_ROOT))
from contract.cli import HelpFormatter  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python load_tests/run_load.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models", help="model repository to serve")
    parser.add_argument("--users", type=int, default=8, help="Locust users")
    parser.add_argument("--spawn-rate", type=float, help="users started per second (default: all at once)")
    parser.add_argument("--duration", default="60s", help="Locust run time, e.g. 60s, 5m")
    parser.add_argument("--images", default="", help="folder of PNG/JPEG images (default: generated)")
    parser.add_argument("--model", default="", help="comma-separated models (default: every ready model)")
    parser.add_argument("--max-fail-ratio", type=float, default=0.01, help="gate: largest share of failed requests")
    parser.add_argument("--max-p95-ms", type=float, default=1000.0, help="gate: largest 95th-percentile latency")
    parser.add_argument("--csv", help="Locust CSV prefix, e.g. runs/load")
    parser.add_argument("--env", action="append", default=[], metavar="IMAGEAI_X=V", help="service setting")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /readyz")
    args = parser.parse_args(argv)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="imageai-load-") as tmp:
        log = Path(tmp) / "service.log"
        extra = {"BENTOML_HOME": str(Path(tmp) / "bentoml"), **dict(item.split("=", 1) for item in args.env)}
        service = start_service(args.models_dir, port, log, extra)
        try:
            wait_ready(url, service, log, args.ready_timeout)
            print(f"service ready at {url} (models from {args.models_dir})", flush=True)
            locust = [
                str(BIN / "locust"), "-f", str(REPO_ROOT / "load_tests" / "locustfile.py"), "--headless",
                "--only-summary", "-H", url, "-u", str(args.users), "-r", str(args.spawn_rate or args.users),
                "-t", args.duration, "--max-fail-ratio", str(args.max_fail_ratio), "--max-p95-ms",
                str(args.max_p95_ms), "--stop-timeout", "10",
            ]  # fmt: skip
            if args.images:
                locust += ["--images", args.images]
            if args.model:
                locust += ["--model", args.model]
            if args.csv:
                Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
                locust += ["--csv", args.csv]
            return subprocess.run(locust, cwd=REPO_ROOT).returncode
        finally:
            stop(service)


if __name__ == "__main__":
    sys.exit(main())
