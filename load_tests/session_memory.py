"""Resident memory and speed of one model's onnxruntime session, with onnxruntime's CPU memory arena on or off.

    python load_tests/session_memory.py models/emotion/4
    python load_tests/session_memory.py models/chest_xray/3 --int8

Each setting runs in its own process (resident memory is per process): load the model as serving does (one
intra-op thread), run it once at every batch size up to --max-batch (what warm-up does), then time --repeats runs
per batch size. Prints resident MB after warm-up and ms per image by batch size. What IMAGEAI_CPU_MEMORY_ARENA
chooses between (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def measure(folder: Path, arena: bool, int8: bool, max_batch: int, repeats: int) -> dict:
    import numpy as np
    import psutil

    from serving.config import Settings
    from serving.repository import ModelRunner

    runner = ModelRunner.load(folder, threads=1, int8=int8, memory_arena=arena)
    sizes = Settings(max_batch_size=max_batch).warmup_batch_sizes
    runner.warm_up(sizes)
    resident_mb = psutil.Process().memory_info().rss / 1e6
    ms_per_image = {}
    for size in sizes:
        batch = np.random.default_rng(0).random((size, *runner.input_shape), dtype=np.float32)
        started = time.perf_counter()
        for _ in range(repeats):
            runner.run(batch)
        ms_per_image[size] = round((time.perf_counter() - started) * 1000 / (repeats * size), 2)
    return {"arena": arena, "precision": runner.precision, "resident_mb": round(resident_mb), "ms": ms_per_image}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a model version folder (models/<name>/<version>)")
    parser.add_argument("--int8", action="store_true", help="the card's int8 file when it is marked served")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # internal: one setting
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.folder, args.one == "on", args.int8, args.max_batch, args.repeats)))
        return 0
    for arena in ("on", "off"):
        command = [sys.executable, __file__, *sys.argv[1:], "--one", arena]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(output.splitlines()[-1])
        mb, ms = result["resident_mb"], result["ms"]
        print(f"arena {arena:3}  {result['precision']}  resident {mb:>5} MB  ms per image by batch size {ms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
