"""`torchrun --nproc_per_node=2 -m training.run`: two CPU processes (gloo) train one model, and rank 0 alone writes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, REPO_ROOT

from tests.synthetic import make_image_folder
from training import distributed


def test_single_process_is_not_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.sampler(range(10), shuffle=True, seed=0) is None
    assert distributed.all_reduce_sums([1.0, 2.0], None) == [1.0, 2.0]  # type: ignore[arg-type]


@pytest.mark.slow
def test_two_processes_train_one_model_and_rank_0_alone_writes(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", ["NORMAL", "PNEUMONIA"], per_class=24, size=32)
    weights, models, runs = tmp_path / "weights", tmp_path / "models", tmp_path / "runs"
    weights.mkdir()
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "tests.ddp_worker", str(weights),
               "chest_xray", "--data", str(data), "--epochs", "1", "--batch-size", "8", "--image-size", "32",
               "--arch", "compact_cnn", "--workers", "0", "--device", "cpu", "--out", str(models),
               "--runs-dir", str(runs), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    print(f"torchrun with 2 processes: {time.perf_counter() - started:.1f} s")
    assert done.returncode == 0, done.stderr[-4000:]

    assert sorted(path.relative_to(models).as_posix() for path in models.glob("*/*")) == ["chest_xray/1"]
    [run_dir] = (runs / "chest_xray").iterdir()
    assert len(list(tmp_path.rglob("metrics.json"))) == 2  # the run's report and its copy beside the model
    assert len(list(runs.rglob("*.onnx"))) == 1 and len(list(models.rglob("*.onnx"))) == 1
    assert (run_dir / "history.csv").read_text().count("\n") == 2  # header + one epoch, written once
    assert done.stderr.count("run folder") == 1 and "2 processes" in done.stderr  # only rank 0 logs
    digests = [(weights / f"rank{rank}.txt").read_text().split() for rank in (0, 1)]
    print(f"parameters sha256 after training: rank 0 {digests[0]}, rank 1 {digests[1]}")
    assert len(digests[0]) == 1 and digests[0] == digests[1]
