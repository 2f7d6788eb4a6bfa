"""Serving throughput against the limit and against the naive alternative, in one run on one machine and model.

    python load_tests/bench.py --images ../shared/datasets/chest_xray/train/NORMAL --out runs/bench.json

1. the limit: onnxruntime in this machine's processes, no HTTP: image bytes → ``contract.preprocessing.preprocess``
   → ``session.run`` at the best batch size (swept), with the service's session settings (IMAGEAI_WORKERS
   processes of IMAGEAI_INTRA_OP_THREADS threads, spinning off, the same graph optimisation); decoding of the next
   batch overlaps inference of the current one;
2. the service: ``bentoml serve serving.service:ImageAI`` started here on a free port, loaded with wrk at each
   concurrency level: images/s, p50/p95/p99, errors and the mean adaptive batch size (from /metrics, the delta of
   the ``bentoml_service_adaptive_batch_size`` histogram's sum and count);
3. the naive server (load_tests/naive_server.py: Starlette + onnxruntime, one image per ``session.run``) at the
   same concurrency levels, twice: ``naive`` as a user writes it (one uvicorn process, onnxruntime's default
   session) and ``naive_tuned`` with the service's worker processes and session settings (so that only batching
   and the framework differ);
4. half saturation: both servers at an offered rate of half the service's peak (wrk connections with exponential
   think times, close to open-loop arrivals); its p99 against the service's single-request latency (p50 at
   concurrency 1);
5. side by side (``--rounds``, 3): the goals' ratios again, from figures measured back to back, round after round:
   the limit, the service at its peak concurrency, the limit again, both naive servers at that concurrency, the
   service at one connection and at half saturation, all three servers up at once, the service's throughput divided
   by the mean of the two limits around it. The parts above are minutes apart, and a shared machine's speed can move
   by half in that time (measured on this project's VMs); these ratios are the headline.
   The service's mean latency is also split by its /metrics stage histograms (preprocessing, queue, inference),
   and its CPU per image by thread (event loop, decoding, inference: the OS thread names serving.threads gives,
   read from /proc), against the limit's CPU per image.

The load generator is Debian's ``wrk`` (C, one thread, a Lua script posting prebuilt multipart bodies of real image
bytes), pinned with ``taskset`` to one core (``--generator-cpus``); the servers may use every core. Both servers
share the CPU with the same generator doing the same work per request, and the generator's own CPU time is measured
and printed for every run (``gen cpu``: share of the machine), as is the servers' (``srv cpu``: cores busy).
Prints a table, the ratios and the goals; writes everything to ``--out`` (JSON).

GPU: ``--device cuda`` runs the limit on the CUDA provider (``--io-binding`` binds inputs and outputs on the
device) and starts both servers with CUDA (IMAGEAI_DEVICE=cuda; naive: NAIVE_DEVICE=cuda); figures from a lent H100
are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import local_service  # noqa: E402
from sample_images import folder_images, generated_images  # noqa: E402

from contract.card import ModelCard, version_folders  # noqa: E402
from contract.cli import HelpFormatter  # noqa: E402
from contract.preprocessing import preprocess  # noqa: E402
from serving.config import Settings, available_cores  # noqa: E402
from serving.threads import INFERENCE_THREADS, OFFLOAD_THREADS  # noqa: E402

BOUNDARY = "----imageai-bench-7d3f0c1b"
LUA_SCRIPT = Path(__file__).with_name("wrk_multipart.lua")
GOALS = {"service_over_limit": 0.8, "service_over_naive": 1.5, "p99_half_over_single": 2.5}
THREAD_JOBS = {INFERENCE_THREADS: "inference", OFFLOAD_THREADS: "decoding"}  # the OS names serving.threads gives


# ------------------------------------------------------------------------------------------------ inputs


def load_images(folder: str | None, count: int) -> list[tuple[str, bytes, str]]:
    """(file name, bytes, content type) of up to `count` images of a folder, spread over it; else generated PNGs."""
    if not folder:
        return generated_images(count)
    images = folder_images(Path(folder), count)
    if not images:
        raise SystemExit(f"no PNG or JPEG images in {folder}")
    return images


def multipart_body(images: Sequence[tuple[str, bytes, str]]) -> bytes:
    """One `image` part per (file name, bytes, content type)."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data, content_type in images
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def write_bodies(images: list[tuple[str, bytes, str]], per_request: int, workdir: Path) -> list[Path]:
    """Multipart bodies of `per_request` images each, cycling through the images, written for wrk to read."""
    bodies = []
    for index in range(len(images)):
        chosen = [images[(index + offset) % len(images)] for offset in range(per_request)]
        body = workdir / f"body{per_request}-{index}.bin"
        body.write_bytes(multipart_body(chosen))
        bodies.append(body)
    return bodies


def resolve_model(models_dir: Path, name: str, version: str | None) -> tuple[Path, ModelCard]:
    found = version_folders(models_dir / name)
    if not found:
        raise SystemExit(f"no versions of model {name!r} in {models_dir}")
    folder = models_dir / name / (version or found[-1])
    return folder, ModelCard.load(folder)


# ------------------------------------------------------------------------------------------------ the limit


def _limit_process(
    folder: str,
    device: str,
    threads: int,
    optimization: str,
    int8: bool,
    memory_arena: bool,
    io_binding: bool,
    images: list[bytes],
    phases: list[tuple[int, float]],
    barrier,
    results,
) -> None:
    """One of `workers` processes: for each (batch size, seconds) phase, decode and run batches for that long."""
    from serving.repository import ModelRunner

    runner = ModelRunner.load(
        Path(folder), device=device, threads=threads, optimization=optimization, int8=int8, memory_arena=memory_arena
    )
    spec = runner.card.input
    run = _io_binding_runner(runner) if io_binding else runner.run
    position = 0

    def prepare(size: int) -> np.ndarray:
        nonlocal position
        batch = [images[(position + i) % len(images)] for i in range(size)]
        position += size
        return np.stack([preprocess(data, spec) for data in batch])

    run(prepare(max(size for size, _ in phases)))  # first-run allocations
    with ThreadPoolExecutor(1) as decoder:
        for size, seconds in phases:
            run(prepare(size))
            barrier.wait()
            done, started, cpu_started = 0, time.perf_counter(), time.process_time()
            upcoming = decoder.submit(prepare, size)
            while time.perf_counter() - started < seconds:
                batch = upcoming.result()
                upcoming = decoder.submit(prepare, size)  # decode the next batch while this one runs
                run(batch)
                done += size
            elapsed = time.perf_counter() - started
            upcoming.result()
            results.put((size, done, elapsed, time.process_time() - cpu_started))


def _io_binding_runner(runner):
    """CUDA: copy the batch to the device once, keep the outputs there until read (untested: no GPU here)."""
    import onnxruntime as ort

    session = runner.session

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        binding = session.io_binding()
        binding.bind_ortvalue_input(runner.input_name, ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0))
        for name in runner.output_names:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding)
        return dict(zip(runner.output_names, binding.copy_outputs_to_cpu(), strict=True))

    return run


def run_limit(
    folder: Path, settings: Settings, images: list[bytes], phases: list[tuple[int, float]], io_binding: bool
) -> tuple[dict[int, float], dict[int, float]]:
    """Images/s and ms of CPU per image (decoding and inference) by phase's batch size, over workers x
    batches-in-flight processes running at once (the service's layout: as many sessions of as many intra-op threads
    running at the same time)."""
    context = mp.get_context("spawn")
    streams = settings.workers * (settings.batches_in_flight if settings.batching == "direct" else 1)
    barrier, results = context.Barrier(streams), context.Queue()
    processes = [
        context.Process(
            target=_limit_process,
            args=(
                str(folder),
                settings.device,
                settings.threads_per_session,
                settings.graph_optimization,
                settings.int8 == "auto",
                settings.cpu_memory_arena,
                io_binding,
                images,
                phases,
                barrier,
                results,
            ),
        )
        for _ in range(streams)
    ]
    for process in processes:
        process.start()
    rates: dict[int, float] = {}
    images_done: dict[int, int] = {}
    cpu_seconds: dict[int, float] = {}
    for _ in range(streams * len(phases)):
        size, done, elapsed, cpu = results.get(timeout=600)
        rates[size] = rates.get(size, 0.0) + done / elapsed
        images_done[size] = images_done.get(size, 0) + done
        cpu_seconds[size] = cpu_seconds.get(size, 0.0) + cpu
    for process in processes:
        process.join()
    return rates, {size: cpu_seconds[size] / images_done[size] * 1000 for size in rates if images_done[size]}


# ------------------------------------------------------------------------------------------------ servers


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    log: Path

    def wait_ready(self, timeout: float, consecutive: int) -> None:
        local_service.wait_ready(self.url, self.process, self.log, timeout, consecutive, name=self.name)

    def log_tail(self, size: int = 3000) -> str:
        return local_service.log_tail(self.log, size)

    def cpu_seconds(self) -> float:
        """CPU time of the server and all its processes so far."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            total = 0.0
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    total += times.user + times.system
            return total
        except psutil.Error:
            return 0.0

    def cpu_seconds_by_thread(self) -> dict[str, float]:
        """CPU time so far of the worker processes' threads, by job: each worker's main thread runs its event loop;
        serving.threads gives inference and decoding threads their names (Linux; exited threads are not counted)."""
        import psutil

        totals = dict.fromkeys(("event loop", "decoding", "inference", "other"), 0.0)
        with contextlib.suppress(psutil.Error):
            for process in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    for thread in process.threads():
                        totals[_thread_job(process.pid, thread.id)] += thread.user_time + thread.system_time
        return totals


def _thread_job(pid: int, tid: int) -> str:
    if tid == pid:
        return "event loop"
    try:
        name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:  # the thread has just exited
        return "other"
    return next((job for prefix, job in THREAD_JOBS.items() if name.startswith(prefix)), "other")


@contextlib.contextmanager
def running(name: str, port: int, process: subprocess.Popen, log: Path) -> Iterator[Server]:
    """A started server, stopped (its process group and all) on the way out."""
    try:
        yield Server(name, f"http://127.0.0.1:{port}", process, log)
    finally:
        local_service.stop(process, timeout=20)


@contextlib.contextmanager
def service(model_folder: Path, card: ModelCard, overrides: dict[str, str], workdir: Path) -> Iterator[Server]:
    """`bentoml serve` on a free port, serving only the benchmarked model (a models/ of one symlink)."""
    models = workdir / "models"
    models.mkdir(exist_ok=True)
    link = models / card.name
    if not link.exists():
        link.symlink_to(model_folder.parent.resolve(), target_is_directory=True)
    port = local_service.free_port()
    env = {
        "BENTOML_HOME": str(workdir / "bentoml"),
        "IMAGEAI_MODEL_VERSIONS": f"{card.name}={card.version}",
        **overrides,
    }
    log = workdir / "service.log"
    process = local_service.start_service(models, port, log, env, lenient=False)  # the one model must load
    with running("service", port, process, log) as server:
        yield server


@contextlib.contextmanager
def naive(model_folder: Path, settings: Settings, workdir: Path, onnx_file: str, tuned: bool) -> Iterator[Server]:
    """As written by hand (one process, onnxruntime defaults) or tuned (the service's workers and session settings)."""
    port = local_service.free_port()
    command = [
        sys.executable, str(Path(__file__).with_name("naive_server.py")), "--model-dir", str(model_folder),
        "--port", str(port), "--device", "cuda" if settings.device == "cuda" else "cpu", "--onnx-file", onnx_file,
    ]  # fmt: skip
    if tuned:
        command += ["--workers", str(settings.workers), "--threads", str(settings.threads_per_session)]
        command += ["--graph-optimization", settings.graph_optimization]
    else:
        command += ["--ort-defaults"]
    name = "naive_tuned" if tuned else "naive"
    log = workdir / f"{name}.log"
    with running(name, port, local_service.start_process(command, dict(os.environ), log), log) as server:
        yield server


SERVICE_HISTOGRAMS = {  # key -> the histogram on the service's /metrics whose sums and counts are read
    "adaptive": "bentoml_service_adaptive_batch_size",
    "ort": "imageai_model_batch_size",
    "preprocess": "imageai_preprocess_seconds",
    "queue": "imageai_queue_seconds",
    "inference": "imageai_inference_seconds",
}


def service_stats(metrics: str) -> dict[str, float]:
    """Sums and counts of the service's batch-size and stage histograms, over every worker and model."""
    totals = {f"{key}_{series}": 0.0 for key in SERVICE_HISTOGRAMS for series in ("sum", "count")}
    for line in metrics.splitlines():
        for key, name in SERVICE_HISTOGRAMS.items():
            if key == "adaptive" and 'method_name="infer"' not in line:
                continue
            if match := re.match(rf"^{name}_(sum|count)\{{[^}}]*\}}\s+(\S+)", line):
                totals[f"{key}_{match.group(1)}"] += float(match.group(2))
    return totals


def _mean_change(before: dict[str, float], after: dict[str, float], key: str) -> float | None:
    count = after[f"{key}_count"] - before[f"{key}_count"]
    return (after[f"{key}_sum"] - before[f"{key}_sum"]) / count if count else None


# ------------------------------------------------------------------------------------------------ load


@dataclass
class Run:
    server: str
    concurrency: int
    seconds: float
    images_per_s: float
    ok: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    think_ms: float = 0.0
    images_per_request: int = 1
    adaptive_batch_mean: float | None = None
    ort_batch_mean: float | None = None
    # the service's mean ms per image preprocessed, per request queued and per onnxruntime call (its /metrics)
    stage_ms: dict[str, float | None] = field(default_factory=dict)
    # the service's workers' ms of CPU per image, by thread: event loop, decoding, inference, other
    cpu_ms_per_image: dict[str, float] = field(default_factory=dict)
    generator_cpu_share: float = 0.0  # of the whole machine
    server_cpu_cores: float = 0.0
    server_cpu_seconds: float = 0.0  # of the server's processes during the run
    raw: dict = field(default_factory=dict)


class Generator:
    """wrk, pinned, posting the prebuilt bodies (each of `images_per_request` images)."""

    def __init__(self, wrk: str, cpus: str, bodies: list[Path], timeout_s: int, images_per_request: int = 1) -> None:
        self.wrk, self.cpus, self.bodies, self.timeout_s = wrk, cpus, bodies, timeout_s
        self.images_per_request = images_per_request

    def run(self, server: Server, path: str, concurrency: int, seconds: float, think_ms: float = 0.0) -> Run:
        command = [
            "taskset", "-c", self.cpus, self.wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
            f"--timeout={self.timeout_s}s", "--latency", "-s", str(LUA_SCRIPT), server.url + path,
            "--", path, BOUNDARY, f"{think_ms:.3f}", *map(str, self.bodies),
        ]  # fmt: skip
        is_service = server.name == "service"
        before_metrics = service_stats(http_get(server.url + "/metrics")[1]) if is_service else None
        threads_before = server.cpu_seconds_by_thread() if is_service else {}
        before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_before, started = server.cpu_seconds(), time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + self.timeout_s + 60)
        wall = time.perf_counter() - started
        server_cpu = server.cpu_seconds() - server_before
        threads_after = server.cpu_seconds_by_thread() if is_service else {}
        after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = [line for line in result.stdout.splitlines() if line.startswith("WRK_JSON ")]
        if result.returncode != 0 or not lines:
            raise RuntimeError(f"wrk failed ({result.returncode}): {result.stdout[-2000:]} {result.stderr[-2000:]}")
        raw = json.loads(lines[-1].removeprefix("WRK_JSON "))
        generator_cpu = (after_children.ru_utime - before_children.ru_utime) + (
            after_children.ru_stime - before_children.ru_stime
        )
        duration = raw["duration_us"] / 1e6
        errors = raw["status_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"]
        ok = raw["requests"] - raw["status_errors"]
        run = Run(
            server=server.name if self.images_per_request == 1 else f"{server.name}×{self.images_per_request}",
            concurrency=concurrency,
            seconds=round(duration, 2),
            images_per_s=ok * self.images_per_request / duration,
            ok=ok,
            errors=errors,
            p50_ms=raw["p50_us"] / 1000,
            p95_ms=raw["p95_us"] / 1000,
            p99_ms=raw["p99_us"] / 1000,
            mean_ms=raw["latency_mean_us"] / 1000,
            think_ms=think_ms,
            images_per_request=self.images_per_request,
            generator_cpu_share=generator_cpu / wall / available_cores(),
            server_cpu_cores=server_cpu / wall,
            server_cpu_seconds=server_cpu,
            raw=raw,
        )
        if ok:
            images = ok * self.images_per_request
            run.cpu_ms_per_image = {
                job: (threads_after[job] - threads_before[job]) / images * 1000 for job in threads_after
            }
        if before_metrics is not None:
            after = service_stats(http_get(server.url + "/metrics")[1])
            run.adaptive_batch_mean = _mean_change(before_metrics, after, "adaptive")
            run.ort_batch_mean = _mean_change(before_metrics, after, "ort")
            for stage in ("preprocess", "queue", "inference"):
                seconds = _mean_change(before_metrics, after, stage)
                run.stage_ms[stage] = None if seconds is None else seconds * 1000
        return run


def sweep(generator: Generator, server: Server, path: str, levels: Sequence[int], seconds: float, warmup: float):
    runs = []
    for concurrency in levels:
        if warmup > 0:
            generator.run(server, path, concurrency, warmup)
        run = generator.run(server, path, concurrency, seconds)
        print_run(run)
        runs.append(run)
    return runs


def at_rate(generator: Generator, server: Server, path: str, rate: float, connections: int, latency_ms: float, seconds):
    """Connections with exponential think times: about `rate` requests/s while latency stays low (calibrated)."""
    think = max(1.0, connections / rate * 1000 - latency_ms)
    for _ in range(2):  # calibrate the nominal think time on short probes: achieved cycle = think x k + latency
        probe = generator.run(server, path, connections, min(5.0, seconds), think)
        if probe.images_per_s <= 0 or abs(probe.images_per_s / rate - 1) < 0.05:
            break
        effective = connections / probe.images_per_s * 1000 - probe.mean_ms
        k = max(effective, 1.0) / think
        think = max(1.0, (connections / rate * 1000 - probe.mean_ms) / k)
    run = generator.run(server, path, connections, seconds, think)
    print_run(run, f"  (offered ≈ {rate:.1f}/s)")
    return run


def side_by_side(
    rounds: int,
    generator: Generator,
    servers: dict[str, Server],
    path: str,
    measure_limit: Callable[[], float],
    concurrency: int,
    half: Run | None,
    seconds: float,
    warmup: float,
) -> list[dict[str, float]]:
    """The goals' ratios from measurements taken close together, `rounds` times over: the limit, the service at
    `concurrency`, the limit again (the service is divided by the mean of the two around it), each naive server at
    `concurrency`, then the service at one connection and at the half-saturation rate (the think times of `half`);
    about a minute and a half per round. A shared machine's speed can move by half within minutes, so ratios of
    figures taken minutes apart (the sweeps) measure the drift as much as the servers."""
    measured = []
    for number in range(1, rounds + 1):
        figures: dict[str, float] = {"limit_before": measure_limit()}
        for name, server in servers.items():
            if warmup > 0:
                generator.run(server, path, concurrency, warmup)
            figures[name] = generator.run(server, path, concurrency, seconds).images_per_s
            if name == "service":
                figures["limit_after"] = measure_limit()
        figures["limit"] = (figures["limit_before"] + figures["limit_after"]) / 2
        figures["service_over_limit"] = figures["service"] / figures["limit"]
        for name in ("naive", "naive_tuned"):
            if name in figures:
                figures[f"service_over_{name}"] = figures["service"] / figures[name]
        single = generator.run(servers["service"], path, 1, seconds)
        figures["single_p50_ms"] = single.p50_ms
        if half is not None:
            at_half = generator.run(servers["service"], path, half.concurrency, seconds, half.think_ms)
            figures["half_rate"], figures["half_p99_ms"] = at_half.images_per_s, at_half.p99_ms
            figures["p99_half_over_single"] = at_half.p99_ms / single.p50_ms
        print(f"round {number}: " + ", ".join(f"{key} {value:.2f}" for key, value in figures.items()), flush=True)
        measured.append(figures)
    return measured


# ------------------------------------------------------------------------------------------------ report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


HEADER = (
    f"{'server':11} {'conc':>5} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7} "
    f"{'batch':>6} {'gen cpu':>8} {'srv cpu':>8}"
)


def print_run(run: Run, note: str = "") -> None:
    print(
        f"{run.server:11} {run.concurrency:>5} {run.images_per_s:>8.1f} {run.p50_ms:>8.1f} {run.p95_ms:>8.1f} "
        f"{run.p99_ms:>8.1f} {run.errors:>7} {_fmt(run.adaptive_batch_mean or run.ort_batch_mean):>6} "
        f"{run.generator_cpu_share:>7.1%} {run.server_cpu_cores:>8.2f}{note}",
        flush=True,
    )


def machine() -> dict[str, object]:
    model = platform.processor()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    import onnxruntime

    versions = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__}
    with contextlib.suppress(ImportError):
        import bentoml

        versions["bentoml"] = bentoml.__version__
    return {
        "cpu": model,
        "cores": available_cores(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "versions": versions,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python load_tests/bench.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", default="chest_xray", help="model name in the repository")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models", help="model repository")
    parser.add_argument("--version", help="model version (default: the highest)")
    parser.add_argument("--images", help="folder of PNG/JPEG images to upload (default: generated PNGs)")
    parser.add_argument("--count", type=int, default=64, help="how many distinct images to cycle through")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32,64", help="wrk connections per level")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level")
    parser.add_argument("--limit-seconds", type=float, default=10.0, help="measured seconds of the limit")
    parser.add_argument("--sweep-seconds", type=float, default=2.0, help="seconds per batch size of the limit sweep")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64", help="batch sizes the limit sweeps")
    parser.add_argument(
        "--images-per-request",
        type=int,
        default=16,
        help="also load the service's batch route (/{model}/predict/batch) with this many images per request "
        "(classifiers; 1 or --skip service_batch: not run)",
    )
    parser.add_argument("--half-connections", type=int, default=16, help="wrk connections of the half-saturation run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="side by side: rounds of the limit, the service at its peak concurrency, the limit again, the naive "
        "servers at that concurrency, the service at one connection and at half saturation, measured back to back; "
        "the ratios of the goals come from these",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="IMAGEAI_X=V",
        help="service setting for this run (repeatable); the limit and the naive server follow its workers, "
        "threads, device and graph optimisation",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="shorthand for --env IMAGEAI_DEVICE=...")
    parser.add_argument("--io-binding", action="store_true", help="limit on CUDA: bind inputs/outputs on the device")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to leave out: limit, service, service_batch, naive, naive_tuned, half, "
        "side_by_side",
    )
    parser.add_argument("--generator-cpus", default=str(max(os.sched_getaffinity(0))), help="taskset list for wrk")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help="wrk binary (Debian: apt-get install wrk)")
    parser.add_argument("--timeout", type=int, default=60, help="wrk request timeout, seconds")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /readyz")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--markdown", type=Path, help="also write the tables here (Markdown)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers (finally blocks) when killed
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    # admission control (a per-client rate limit, a cap on requests in flight) would refuse the one client that
    # the benchmark is: off unless asked for
    overrides = {"IMAGEAI_RATE_LIMIT_RPS": "0", "IMAGEAI_MAX_IN_FLIGHT": "0"}
    overrides.update(item.split("=", 1) for item in args.env)
    if args.device:
        overrides["IMAGEAI_DEVICE"] = args.device
    settings = Settings.from_env({**os.environ, **overrides})
    folder, card = resolve_model(args.models_dir, args.model, args.version)
    path = f"/{card.name}/predict" if card.kind == "classifier" else f"/{card.name}/encode"
    # the file the service serves (serving.repository: the card's int8 file when marked served, unless IMAGEAI_INT8=off)
    quantized = card.quantized if settings.int8 == "auto" and card.quantized and card.quantized.served else None
    onnx_file = quantized.file if quantized else card.onnx.file
    images = load_images(args.images, args.count)
    levels = sorted({int(level) for level in args.concurrency.split(",")})
    if shutil.which(args.wrk) is None and not ("service" in skip and "naive" in skip):
        raise SystemExit(f"{args.wrk} not found: apt-get install wrk")

    report: dict[str, object] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "model": {
            "name": card.name,
            "version": card.version,
            "architecture": card.architecture,
            "file": onnx_file,
            "precision": "int8" if quantized else "fp32",
        },
        "input": card.input.describe(),
        "images": {"source": args.images or "generated", "count": len(images)},
        "settings": {
            **settings.model_dump(mode="json", exclude={"models_dir", "model_versions"}),
            "threads_per_session": settings.threads_per_session,
            "batches_in_flight": settings.batches_in_flight,
        },
        "overrides": overrides,
        "route": path,
        "generator": f"wrk -t1 pinned to CPU {args.generator_cpus}",
    }
    print(
        f"model {card.name} v{card.version} ({card.architecture}, {onnx_file}; {card.input.describe()}), "
        f"{len(images)} images from "
        f"{args.images or 'generated PNGs'}; {settings.workers} worker(s) x {settings.threads_per_session} "
        f"intra-op thread(s) x {settings.batches_in_flight} batch(es) in flight, {settings.batching} batching, "
        f"max batch {settings.max_batch_size}, max latency {settings.max_latency_ms} ms; "
        f"{report['machine']['cpu']}, {available_cores()} cores",
        flush=True,
    )

    if "limit" not in skip:
        sizes = sorted({int(size) for size in args.batch_sizes.split(",")})
        data = [image for _, image, _ in images]
        sweep_phases = [(size, args.sweep_seconds) for size in sizes]
        sweep_rates, _ = run_limit(folder, settings, data, sweep_phases, args.io_binding)
        best = max(sweep_rates, key=sweep_rates.__getitem__)
        rates, cpu_ms = run_limit(folder, settings, data, [(best, args.limit_seconds)], args.io_binding)
        report["limit"] = {
            "images_per_s": rates[best],
            "batch_size": best,
            "cpu_ms_per_image": cpu_ms.get(best),
            "sweep": sweep_rates,
        }
        sweep_text = ", ".join(f"{size}: {value:.0f}" for size, value in sweep_rates.items())
        print(
            f"limit: {rates[best]:.1f} images/s at batch size {best}, {cpu_ms.get(best, 0.0):.2f} ms of CPU per image "
            f"(sweep, images/s by batch size: {sweep_text})"
        )

    with tempfile.TemporaryDirectory(prefix="imageai-bench-") as tmp:
        workdir = Path(tmp)
        generator = Generator(args.wrk, args.generator_cpus, write_bodies(images, 1, workdir), args.timeout)
        per_request = args.images_per_request if card.kind == "classifier" and "service_batch" not in skip else 0
        if per_request > 1:
            bodies = write_bodies(images, per_request, workdir)
            batch_generator = Generator(args.wrk, args.generator_cpus, bodies, args.timeout, per_request)
        results: dict[str, list[Run]] = {}
        half: dict[str, Run] = {}
        servers = [("service", lambda: service(folder, card, overrides, workdir))]
        servers.append(("naive", lambda: naive(folder, settings, workdir, onnx_file, tuned=False)))
        servers.append(("naive_tuned", lambda: naive(folder, settings, workdir, onnx_file, tuned=True)))
        target_rate = None
        for name, launch in servers:
            if name in skip:
                continue
            with launch() as server:
                server.wait_ready(args.ready_timeout, consecutive=2 * settings.workers)
                print(f"\n{name} ready at {server.url}\n{HEADER}", flush=True)
                results[name] = sweep(generator, server, path, levels, args.seconds, args.warmup)
                if "half" not in skip:
                    if target_rate is None:
                        peak = max(results[name], key=lambda run: run.images_per_s)
                        single = next((run for run in results[name] if run.concurrency == 1), None)
                        target_rate = peak.images_per_s / 2
                        single_ms = single.p50_ms if single else 0.0
                    half[name] = at_rate(
                        generator, server, path, target_rate, args.half_connections, single_ms, args.seconds
                    )
                if name == "service":
                    if per_request > 1:
                        print(f"\nservice, {per_request} images per request ({path}/batch)\n{HEADER}", flush=True)
                        results["service_batch"] = sweep(
                            batch_generator, server, path + "/batch", levels, args.seconds, args.warmup
                        )
                    report["service_log_tail"] = server.log_tail(4000)

        if "side_by_side" not in skip and "limit" in report and "service" in results and args.rounds > 0:
            peak = max(results["service"], key=lambda run: run.images_per_s).concurrency
            print(f"\nside by side at {peak} connections, {args.rounds} rounds", flush=True)
            with contextlib.ExitStack() as stack:
                running = {name: stack.enter_context(launch()) for name, launch in servers if name not in skip}
                for server in running.values():
                    server.wait_ready(args.ready_timeout, consecutive=2 * settings.workers)
                best = report["limit"]["batch_size"]
                report["side_by_side"] = side_by_side(
                    args.rounds,
                    generator,
                    running,
                    path,
                    lambda: run_limit(folder, settings, data, [(best, args.limit_seconds)], args.io_binding)[0][best],
                    peak,
                    half.get("service"),
                    args.seconds,
                    args.warmup,
                )

    report["runs"] = {name: [asdict(run) for run in runs] for name, runs in results.items()}
    report["half_saturation"] = {name: asdict(run) for name, run in half.items()}
    report["ratios"] = summarize(report, results, half)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(report))
        print(f"wrote {args.markdown}")
    return 0


def markdown(report: dict) -> str:
    """The run as Markdown tables, for docs/performance.md."""
    lines = [f"Run {report['date']}: `{report['command']}`", ""]
    if "limit" in report:
        limit = report["limit"]
        sweep = ", ".join(f"{size}: {rate:.0f}" for size, rate in limit["sweep"].items())
        lines += [
            f"Limit: **{limit['images_per_s']:.1f} images/s** at batch size {limit['batch_size']}, "
            f"{_fmt(limit.get('cpu_ms_per_image'), 2)} ms of CPU per image (sweep, images/s by batch size: {sweep}).",
            "",
        ]
    lines += [
        "| server | conc. | images/s | p50 ms | p95 ms | p99 ms | errors | mean batch | generator CPU | server cores "
        "| CPU ms per image: event loop + decoding + inference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [run for runs in report.get("runs", {}).values() for run in runs]
    rows += [{**run, "concurrency": f"{run['concurrency']} (½ sat.)"} for run in report["half_saturation"].values()]
    for run in rows:
        batch = run["adaptive_batch_mean"] or run["ort_batch_mean"]
        cpu = run.get("cpu_ms_per_image") or {}
        split = " + ".join(f"{cpu[job]:.2f}" for job in ("event loop", "decoding", "inference")) if cpu else "-"
        lines.append(
            f"| {run['server']} | {run['concurrency']} | {run['images_per_s']:.1f} | {run['p50_ms']:.1f} | "
            f"{run['p95_ms']:.1f} | {run['p99_ms']:.1f} | {run['errors']} | {_fmt(batch)} | "
            f"{run['generator_cpu_share']:.1%} | {run['server_cpu_cores']:.2f} | {split} |"
        )
    if report.get("side_by_side"):
        keys = list(report["side_by_side"][0])
        lines += ["", "Side by side (each round measured back to back):", ""]
        lines += ["| round | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
        for number, figures in enumerate(report["side_by_side"], 1):
            lines.append(f"| {number} | " + " | ".join(_fmt(figures.get(key), 2) for key in keys) + " |")
    ratios = report.get("ratios", {})
    lines += ["", "```", json.dumps(ratios, indent=1), "```", ""]
    return "\n".join(lines)


def summarize(report: dict, results: dict[str, list[Run]], half: dict[str, Run]) -> dict[str, object]:
    ratios: dict[str, object] = {}
    print()
    service_runs = results.get("service", [])
    if not service_runs:
        return ratios
    peak = max(service_runs, key=lambda run: run.images_per_s)
    ratios["service_peak"] = {"images_per_s": peak.images_per_s, "concurrency": peak.concurrency}
    print(f"service peak: {peak.images_per_s:.1f} images/s at concurrency {peak.concurrency}")
    if "limit" in report:
        value = peak.images_per_s / report["limit"]["images_per_s"]
        ratios["service_over_limit"] = value
        print(f"service/limit, sweeps minutes apart: {value:.2f} (goal ≥ {GOALS['service_over_limit']})")
    for name in ("naive", "naive_tuned"):
        runs = {run.concurrency: run for run in results.get(name, [])}
        if not runs:
            continue
        naive_peak = max(runs.values(), key=lambda run: run.images_per_s)
        by_level = {
            run.concurrency: run.images_per_s / runs[run.concurrency].images_per_s
            for run in service_runs
            if run.concurrency in runs and runs[run.concurrency].images_per_s > 0
        }
        ratios[f"service_over_{name}_by_concurrency"] = by_level
        ratios[f"service_over_{name}_at_service_peak"] = by_level.get(peak.concurrency)
        ratios[f"service_peak_over_{name}_peak"] = peak.images_per_s / naive_peak.images_per_s
        print(
            f"service/{name} at equal concurrency, sweeps minutes apart: "
            + ", ".join(f"c={level}: {value:.2f}" for level, value in by_level.items())
            + f" (goal ≥ {GOALS['service_over_naive']}); peak/peak {ratios[f'service_peak_over_{name}_peak']:.2f}"
        )
    batch_runs = results.get("service_batch", [])
    if batch_runs and "limit" in report:
        batch_peak = max(batch_runs, key=lambda run: run.images_per_s)
        value = batch_peak.images_per_s / report["limit"]["images_per_s"]
        ratios["service_batch_peak"] = {"images_per_s": batch_peak.images_per_s, "concurrency": batch_peak.concurrency}
        ratios["service_batch_over_limit"] = value
        print(
            f"service with {batch_peak.images_per_request} images per request: {batch_peak.images_per_s:.1f} "
            f"images/s at concurrency {batch_peak.concurrency} = {value:.2f} x the limit"
        )
    single = next((run for run in service_runs if run.concurrency == 1), None)
    if single and "service" in half:
        value = half["service"].p99_ms / single.p50_ms
        ratios["single_request_ms"] = single.p50_ms
        ratios["p99_half_saturation_ms"] = half["service"].p99_ms
        ratios["half_saturation_rate"] = half["service"].images_per_s
        ratios["p99_half_over_single"] = value
        print(
            f"p99 at half saturation ({half['service'].images_per_s:.1f}/s): {half['service'].p99_ms:.1f} ms = "
            f"{value:.2f} x the single-request latency {single.p50_ms:.1f} ms "
            f"(goal ≤ {GOALS['p99_half_over_single']})"
        )
    for name in ("naive", "naive_tuned"):
        if name in half:
            print(f"{name} at the same offered rate: p99 {half[name].p99_ms:.1f} ms")
    if report.get("side_by_side"):
        ratios["side_by_side"] = side_by_side_summary(report["side_by_side"])
    for label, run in (("one connection", single), ("half saturation", half.get("service"))):
        if run is not None and run.stage_ms.get("inference") is not None:
            print(f"service at {label}: {where_the_time_went(run)}")
    limit_cpu = report.get("limit", {}).get("cpu_ms_per_image")
    for label, run in (("one connection", single), ("half saturation", half.get("service")), ("its peak", peak)):
        if run is not None and run.cpu_ms_per_image:
            print(f"service at {label}: {where_the_cpu_went(run, limit_cpu)}")
    return ratios


def side_by_side_summary(rounds: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median, lowest and highest of each goal's ratio over the side-by-side rounds, printed against the goals."""
    goals = {
        "service_over_limit": ("≥", GOALS["service_over_limit"]),
        "service_over_naive": ("≥", GOALS["service_over_naive"]),
        "service_over_naive_tuned": ("≥", GOALS["service_over_naive"]),
        "p99_half_over_single": ("≤", GOALS["p99_half_over_single"]),
    }
    summary = {}
    print(f"side by side, {len(rounds)} rounds (median, range):")
    for key, (sign, goal) in goals.items():
        values = [figures[key] for figures in rounds if key in figures]
        if values:
            summary[key] = {"median": float(np.median(values)), "min": min(values), "max": max(values)}
            print(f"  {key}: {summary[key]['median']:.2f} ({min(values):.2f}–{max(values):.2f}); goal {sign} {goal}")
    return summary


def where_the_time_went(run: Run) -> str:
    """The service's mean latency split by its /metrics stage histograms; inference is per onnxruntime call, which
    a request shares with the rest of its batch."""
    stages = {stage: run.stage_ms.get(stage) or 0.0 for stage in ("preprocess", "queue", "inference")}
    rest = run.mean_ms - sum(stages.values())
    return (
        f"mean {run.mean_ms:.1f} ms = preprocessing {stages['preprocess']:.2f} + queue {stages['queue']:.2f} + "
        f"inference {stages['inference']:.2f} (calls of {_fmt(run.ort_batch_mean, 2)} images) + the rest (HTTP, "
        f"multipart, hand-offs, the generator) {rest:.2f}"
    )


def where_the_cpu_went(run: Run, limit_ms: float | None) -> str:
    """The service's CPU per image by thread, against the limit's (decoding and inference, no HTTP)."""
    jobs = run.cpu_ms_per_image
    split = " + ".join(f"{job} {jobs[job]:.2f}" for job in ("event loop", "decoding", "inference", "other"))
    against = f"; the limit {limit_ms:.2f}" if limit_ms else ""
    return f"CPU per image {sum(jobs.values()):.2f} ms = {split}{against}"


if __name__ == "__main__":
    sys.exit(main())
