"""Training throughput: our data pipeline and training step against the naive torchvision way, same task and model.

    python load_tests/train_bench.py --task chest_xray --data ../shared/datasets/chest_xray --out runs/train_bench.json

- ours: ``training.data.load_dataset`` (every image decoded once by ``contract.preprocessing`` and cached as uint8
  pixels at the model's size), per-sample torchvision v2 augmentation on those pixels, and the batch normalised
  by ``contract.preprocessing.normalize`` in the collate function (``training.engine.make_loader``, with the
  loader workers training.run uses by default);
- naive: ``torchvision.datasets.ImageFolder`` decoding every JPEG with PIL every epoch, then grayscale/RGB,
  resize, the same augmentation, ToTensor and Normalize per sample, ``DataLoader(num_workers=2)``.

Both feed the task's default architecture (or ``--arch``) with the task's batch size, Adam and cross-entropy on the
CPU (or ``--device cuda``); ours in the channels-last memory format, as training.run does by default (and with
``--amp``, in mixed precision on CUDA), the naive one in PyTorch's default layout. Each measurement runs in its own
process so that its peak memory (``ru_maxrss`` of the process and of its largest loader worker) is its own: ``data``
iterates the loader only, ``train`` adds the training step, ``step`` times the training step alone on one batch kept
on the device (what AMP and channels-last change). Images/s over the timed batches, after warm-up batches. A few
minutes in all.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from contract.cli import HelpFormatter  # noqa: E402

GOAL = 3.0


def _loader(pipeline: str, args: argparse.Namespace):
    import torch
    from torchvision.transforms import v2

    from training.engine import build_augmentation, make_loader
    from training.task_files import resolve_task

    spec = resolve_task(args.task)
    batch_size = args.batch_size or spec.recipe.batch_size
    if pipeline == "ours":
        from training.data import load_dataset

        started = time.perf_counter()
        data = load_dataset(spec, args.data, seed=0, cache_dir=args.cache_dir)
        load_seconds = time.perf_counter() - started
        split = data.splits["train"]
        loader = make_loader(split, spec.input, batch_size, spec.augment, args.workers, True, 0)
        return loader, len(data.classes), spec, batch_size, load_seconds

    from torchvision.datasets import ImageFolder

    inp = spec.input
    steps: list = [v2.Grayscale(1) if inp.channels == 1 else v2.RGB(), v2.Resize((inp.height, inp.width))]
    augmentation = build_augmentation(spec.augment, (inp.height, inp.width))
    if augmentation is not None:
        steps.append(augmentation)
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if inp.normalization == "mean_std":
        steps.append(v2.Normalize(list(inp.mean), list(inp.std)))
    root = args.data / "train" if (args.data / "train").is_dir() else args.data
    dataset = ImageFolder(str(root), transform=v2.Compose(steps))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=args.naive_workers, persistent_workers=True
    )
    return loader, len(dataset.classes), spec, batch_size, 0.0


def measure(pipeline: str, mode: str, args: argparse.Namespace) -> dict:
    """One measurement, in this process: images/s and peak memory."""
    import torch
    from torch import nn

    from training.architectures import create_model

    torch.manual_seed(0)
    loader, classes, spec, batch_size, load_seconds = _loader(pipeline, args)
    device = torch.device(args.device)
    layout = torch.channels_last if pipeline == "ours" and args.channels_last else torch.contiguous_format
    amp = args.amp and device.type == "cuda" and pipeline == "ours"
    model = optimizer = None
    if mode in ("train", "step"):
        arch = args.arch or spec.arch
        options = dict(spec.arch_options) if arch == spec.arch else {}
        model = create_model(
            arch, in_chans=spec.input.channels, num_classes=classes, image_size=spec.input.height, **options
        ).to(device, memory_format=layout)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.recipe.lr)
        scaler = torch.amp.GradScaler(device.type, enabled=amp)
        criterion = nn.CrossEntropyLoss()
    warmup, timed = (args.warmup, args.data_batches) if mode == "data" else (args.warmup, args.batches)
    images, started = 0, None
    batches = iter(loader)
    for index in range(warmup + timed):
        if index == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, images = time.perf_counter(), 0
        if mode != "step" or index == 0:  # step: the first batch over and over, already on the device
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
        if model is not None:
            x, y = x.to(device).contiguous(memory_format=layout), y.to(device)
            with torch.autocast(device.type, enabled=amp):
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        images += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "pipeline": pipeline,
        "mode": mode,
        "images_per_s": images / seconds,
        "images": images,
        "seconds": round(seconds, 2),
        "batch_size": batch_size,
        "arch": (args.arch or spec.arch) if model is not None else None,
        "channels_last": layout == torch.channels_last,
        "amp": amp,
        "load_seconds": round(load_seconds, 2),  # ours: reading the cached pixels (or decoding them once)
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python load_tests/train_bench.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--task", default="chest_xray", help="task or task file: its data, input size, model")
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO_ROOT.parent / "shared" / "datasets" / "chest_xray",
        help="the task's dataset root (its Kaggle layout, as for training.run)",
    )
    parser.add_argument("--arch", help="architecture (default: the task's)")
    parser.add_argument("--batch-size", type=int, help="default: the task's")
    parser.add_argument("--workers", type=int, default=1, help="our loader's workers (training.run's default)")
    parser.add_argument("--naive-workers", type=int, default=2, help="the naive loader's workers")
    parser.add_argument("--batches", type=int, default=12, help="timed training batches")
    parser.add_argument("--data-batches", type=int, default=30, help="timed batches of the loader-only runs")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument(
        "--modes",
        default="data,train",
        help="data (loader only), train (loader + training step), step (training step alone, one batch on the device)",
    )
    parser.add_argument("--device", default="cpu", help="where to train: cpu or cuda")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ours trains in channels-last, training.run's default (the naive pipeline never does)",
    )
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="ours on CUDA: automatic mixed precision (off by default, as in training.run)",
    )
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache", help="training's decoded-image cache")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--one", nargs=2, metavar=("PIPELINE", "MODE"), help=argparse.SUPPRESS)  # internal
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(measure(*args.one, args)), flush=True)
        return 0
    forwarded = list(argv if argv is not None else sys.argv[1:])
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    results = []
    print(f"{'mode':6} {'pipeline':8} {'img/s':>8} {'peak MB':>8} {'worker MB':>9}  notes", flush=True)
    for mode in modes:
        for pipeline in ("ours", "naive"):
            command = [sys.executable, __file__, *forwarded, "--one", pipeline, mode]
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=dict(os.environ))
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{pipeline} {mode} failed:\n{done.stderr[-3000:]}")
            result = json.loads(lines[-1].removeprefix("RESULT "))
            results.append(result)
            note = f"cache read {result['load_seconds']} s" if pipeline == "ours" else ""
            print(
                f"{mode:6} {pipeline:8} {result['images_per_s']:>8.1f} {result['peak_rss_mb']:>8.0f} "
                f"{result['peak_worker_rss_mb']:>9.0f}  {note}",
                flush=True,
            )
    ratios = {}
    for mode in modes:
        by = {r["pipeline"]: r for r in results if r["mode"] == mode}
        if {"ours", "naive"} <= by.keys():
            ratios[mode] = by["ours"]["images_per_s"] / by["naive"]["images_per_s"]
            print(f"{mode}: ours / naive = {ratios[mode]:.2f} (goal ≥ {GOAL:g})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"task": args.task, "data": str(args.data), "results": results, "ratios": ratios}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
