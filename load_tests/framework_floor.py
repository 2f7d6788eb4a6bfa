"""What an HTTP request costs the server before any image work: the floor under the service's event loop.

    python load_tests/framework_floor.py --images ../shared/datasets/chest_xray/train/NORMAL

Serves load_tests/noop_app.py's route (read the multipart upload, answer a prediction-sized JSON, nothing else) in
one process each: ``bare`` (uvicorn with httptools and uvloop, Starlette, no access log: a hand-written server),
``bentoml`` (mounted in a BentoML service with the service's own options, ``Settings.bentoml_options``) and
``bentoml_quiet`` (the same with ``IMAGEAI_ACCESS_LOG=false``). wrk, pinned to one core as in load_tests/bench.py,
posts real image bodies at each server in turn, round after round; the server's CPU time (all its processes) per
request is the figure.

Why: bench.py prints the service's CPU per image by thread (event loop, decoding, inference) and the limit's. At
0.8 × the limit's throughput a request may cost 1.25 × the limit's CPU per image; what decoding and inference leave
of that is the budget for everything else, and this script says how much of it the HTTP stack alone takes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

import local_service  # noqa: E402
from bench import Generator, Server, load_images, running, write_bodies  # noqa: E402

from contract.cli import HelpFormatter  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = ("bare", "bentoml", "bentoml_quiet")


@contextlib.contextmanager
def noop_server(variant: str, workdir: Path) -> Iterator[Server]:
    port = local_service.free_port()
    if variant == "bare":
        command = [sys.executable, "-m", "uvicorn", "noop_app:app", "--loop", "uvloop", "--http", "httptools"]
        command += ["--no-access-log", "--log-level", "warning"]
    else:
        command = [sys.executable, "-m", "bentoml", "serve", "noop_app:NoOp"]
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE),
        "BENTOML_DO_NOT_TRACK": "true",
        "BENTOML_HOME": str(workdir / "bentoml"),
        **({"IMAGEAI_ACCESS_LOG": "false"} if variant == "bentoml_quiet" else {}),
    }
    log = workdir / f"{variant}.log"
    process = local_service.start_process([*command, "--host", "127.0.0.1", "--port", str(port)], env, log)
    with running(variant, port, process, log) as server:
        server.wait_ready(timeout=120, consecutive=2)
        yield server


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python load_tests/framework_floor.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--images", help="folder of PNG/JPEG images to upload (default: generated PNGs)")
    parser.add_argument("--count", type=int, default=16, help="how many distinct images to cycle through")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per server and round")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each server once per round")
    parser.add_argument("--generator-cpus", default=str(max(os.sched_getaffinity(0))), help="for wrk")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help="wrk binary (Debian: apt-get install wrk)")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="imageai-floor-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        generator = Generator(
            args.wrk, args.generator_cpus, write_bodies(load_images(args.images, args.count), 1, workdir), 30
        )
        servers = [stack.enter_context(noop_server(variant, workdir)) for variant in VARIANTS]
        for round_number in range(1, args.rounds + 1):
            for server in servers:
                if args.warmup > 0:
                    generator.run(server, "/noop", args.connections, args.warmup)
                run = generator.run(server, "/noop", args.connections, args.seconds)
                cpu_ms = run.server_cpu_seconds / max(run.ok, 1) * 1000
                row = {"requests_per_s": run.images_per_s, "cpu_ms_per_request": cpu_ms, "p50_ms": run.p50_ms}
                results[server.name].append(row | {"errors": run.errors})
                print(
                    f"round {round_number}  {server.name:<13} {run.images_per_s:7.0f} requests/s  "
                    f"{cpu_ms:.3f} ms of server CPU per request  p50 {run.p50_ms:.2f} ms  errors {run.errors}",
                    flush=True,
                )
    summary = {variant: median(row["cpu_ms_per_request"] for row in rows) for variant, rows in results.items()}
    print("median CPU per request: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in summary.items()))
    print(
        f"BentoML's layers, as the service configures them: {summary['bentoml'] - summary['bare']:+.3f} ms per request"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"connections": args.connections, "runs": results, "median": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
