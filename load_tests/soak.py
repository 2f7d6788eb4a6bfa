"""Soak test: the service on the shipped models under steady load for a long while, watching memory and latency.

    python load_tests/soak.py                     # 10 minutes at 70 % of the measured saturation, all models
    python load_tests/soak.py --minutes 0.5 --probe-seconds 15     # a quick try of the machinery

1. starts `bentoml serve serving.service:ImageAI` on --models-dir (rate limit off: the load comes from one address);
2. measures saturation: --probe-users closed-loop Locust users, no wait, for --probe-seconds; successful req/s;
3. runs Locust at --load x saturation (constant throughput per user) for --minutes, mixing every route of every
   ready model, while sampling the RSS of the server's process tree (psutil) every --sample-seconds;
4. writes report.json and report.md to --out and prints them: failures, RSS growth from minute 2 to the end
   (goal < 10 %), latency percentiles per minute. Exits non-zero when a goal is missed.
Locust runs on the same machine and takes CPU from the server: the figures are for this whole box.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from local_service import BIN, REPO_ROOT, free_port, start_service, stop, wait_ready
from targets import ROUTES


def targets(url: str) -> list[dict[str, Any]]:
    """Every route of every ready model, with the image shape to send."""
    found = []
    for model in httpx.get(url + "/models", timeout=10).json()["models"]:
        if model["status"] != "ready":
            continue
        spec = model["card"]["input"]
        size = min(512, max(64, 2 * spec["height"]))
        found += [
            {"path": f"/{model['name']}/{action}", "channels": spec["channels"], "size": size, "images": images}
            for action, _, images in ROUTES[model["card"]["kind"]]
        ]
    if not found:
        raise SystemExit("no ready model to soak")
    return found


def tree_rss(pid: int) -> tuple[int, dict[str, int]]:
    """Total resident memory of a process and its descendants, and each one's (by 'pid name')."""
    root = psutil.Process(pid)
    parts = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            parts[f"{process.pid} {' '.join(process.cmdline()[1:3])[:60]}"] = process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return sum(parts.values()), parts


def run_locust(url: str, users: int, seconds: float, env: dict[str, str], report: Path) -> dict[str, Any]:
    command = [
        str(BIN / "locust"), "-f", str(REPO_ROOT / "load_tests" / "soak_locustfile.py"), "--headless",
        "--only-summary", "-H", url, "-u", str(users), "-r", str(users), "-t", f"{math.ceil(seconds)}s",
        "--stop-timeout", "30", "--loglevel", "WARNING",
    ]  # fmt: skip
    environment = {**os.environ, **env, "SOAK_REPORT": str(report)}
    subprocess.run(command, cwd=REPO_ROOT, env=environment, check=False, capture_output=True, timeout=seconds + 120)
    return json.loads(report.read_text())


def sample_memory(pid: int, every: float, samples: list[dict[str, Any]], stop: threading.Event) -> None:
    started = time.monotonic()
    while True:
        total, parts = tree_rss(pid)
        samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": round(total / 2**20, 1), "parts": parts})
        if stop.wait(every):
            return


def markdown(report: dict[str, Any]) -> str:
    soak = report["soak"]
    lines = [
        f"Soak: {report['minutes']} min at {report['target_rps']:.1f} req/s "
        f"({report['load']:.0%} of the measured saturation, {report['saturation_rps']:.1f} successful req/s "
        f"with {report['probe_users']} closed-loop users); {len(report['targets'])} routes of "
        f"{len({t['path'].split('/')[1] for t in report['targets']})} models.",
        "",
        f"- requests {soak['requests']}, failures {soak['failures']} ({report['failure_ratio']:.3%}), "
        f"achieved {soak['rps']:.1f} req/s; p50 {soak['p50_ms']} ms, p95 {soak['p95_ms']} ms, p99 {soak['p99_ms']} ms",
        f"- server RSS (process tree): {report['rss_start_mb']} MB at minute 2 → {report['rss_end_mb']} MB at the "
        f"end: {report['rss_growth']:+.1%} (goal < 10 %); peak {report['rss_peak_mb']} MB",
        "",
        "| minute | requests | failures | p50 ms | p95 ms | p99 ms | max ms | RSS MB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in soak["minutes"]:
        rss = [s["rss_mb"] for s in report["memory"] if (row["minute"] - 1) * 60 <= s["t_s"] < row["minute"] * 60]
        failures = ", ".join(f"{k}: {v}" for k, v in row["failures"].items()) or "0"
        lines.append(
            f"| {row['minute']} | {row['requests']} | {failures} | {row['p50_ms']} | {row['p95_ms']} | "
            f"{row['p99_ms']} | {row['max_ms']} | {rss[-1] if rss else ''} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.7, help="share of the saturation throughput to run at")
    parser.add_argument("--rps", type=float, default=0.0, help="target req/s; skips the saturation probe")
    parser.add_argument("--probe-users", type=int, default=16)
    parser.add_argument("--probe-seconds", type=float, default=40.0)
    parser.add_argument("--users", type=int, default=16, help="Locust users sharing the target throughput")
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    parser.add_argument("--max-growth", type=float, default=0.10, help="RSS growth goal, minute 2 to the end")
    parser.add_argument("--max-fail-ratio", type=float, default=0.001)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / time.strftime("soak-%Y%m%d-%H%M%S"))
    parser.add_argument("--env", action="append", default=[], help="extra server setting NAME=VALUE (repeatable)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = dict(item.split("=", 1) for item in args.env)
    log = args.out / "server.log"
    server = start_service(args.models_dir, port, log, extra)
    try:
        wait_ready(url, server, log, timeout=300)
        routes = targets(url)
        env = {"SOAK_TARGETS": json.dumps(routes)}
        print(f"serving at {url}: {', '.join(t['path'] for t in routes)}", flush=True)
        if args.rps > 0:
            saturation, target = args.rps / args.load, args.rps
        else:
            probe = run_locust(
                url, args.probe_users, args.probe_seconds, {**env, "SOAK_USER_RPS": "0"}, args.out / "probe.json"
            )
            saturation = probe["ok_rps"]
            target = args.load * saturation
            print(f"saturation: {saturation:.1f} successful req/s ({probe['rps']:.1f} req/s sent, "
                  f"p95 {probe['p95_ms']} ms, {probe['failures']} failures)", flush=True)  # fmt: skip
        time.sleep(5)  # let the queues drain before the soak

        samples: list[dict[str, Any]] = []
        sampling_done = threading.Event()
        sampler = threading.Thread(target=sample_memory, args=(server.pid, args.sample_seconds, samples, sampling_done))
        sampler.start()
        user_rps = target / args.users
        soak = run_locust(
            url, args.users, args.minutes * 60, {**env, "SOAK_USER_RPS": str(user_rps)}, args.out / "soak.json"
        )
        sampling_done.set()
        sampler.join()
    finally:
        stop(server)

    from_t = min(120.0, args.minutes * 60 / 5)  # minute 2, or a fifth of a short run
    start = next((s for s in samples if s["t_s"] >= from_t), samples[-1])
    end = samples[-1]
    report = {
        "minutes": args.minutes,
        "load": args.load,
        "saturation_rps": saturation,
        "target_rps": target,
        "probe_users": args.probe_users,
        "targets": routes,
        "soak": soak,
        "failure_ratio": soak["failures"] / max(soak["requests"], 1),
        "rss_start_mb": start["rss_mb"],
        "rss_end_mb": end["rss_mb"],
        "rss_growth": end["rss_mb"] / start["rss_mb"] - 1,
        "rss_peak_mb": max(s["rss_mb"] for s in samples),
        "memory": samples,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "report.md").write_text(text)
    print(text)
    ok = report["rss_growth"] < args.max_growth and report["failure_ratio"] <= args.max_fail_ratio
    print(f"soak {'passed' if ok else 'FAILED'}; report in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
