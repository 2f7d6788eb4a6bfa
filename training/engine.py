"""The training loop: class-weighted loss, checkpoint-best, reduce-LR-on-plateau, early stopping, AMP on CUDA, and
a resumable state saved after every epoch."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from contract.card import InputSpec
from contract.preprocessing import normalize
from training import distributed
from training.data import Split
from training.files import written_whole
from training.tasks import Augment, Recipe

log = logging.getLogger(__name__)


def build_augmentation(augment: Augment, size: tuple[int, int]) -> v2.Transform | None:
    steps: list[v2.Transform] = []
    square = size[0] == size[1]
    if augment.crop:
        steps.append(v2.RandomResizedCrop(size, scale=(augment.crop, 1.0), antialias=True))
    if augment.right_angles and square:
        steps.append(v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)]))
    if augment.rotation or augment.shift or augment.shear or augment.zoom:
        steps.append(
            v2.RandomAffine(
                degrees=augment.rotation,
                translate=(augment.shift, augment.shift) if augment.shift else None,
                scale=(1 - augment.zoom, 1 + augment.zoom) if augment.zoom else None,
                shear=augment.shear or None,
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.vflip:
        steps.append(v2.RandomVerticalFlip())
    if augment.brightness or augment.contrast:
        steps.append(v2.ColorJitter(brightness=augment.brightness or None, contrast=augment.contrast or None))
    if augment.erasing:
        steps.append(v2.RandomErasing(p=augment.erasing))
    return v2.Compose(steps) if steps else None


class PixelDataset(TorchDataset):
    """Cached uint8 pixels, fetched a batch at a time; each image of the batch is augmented on its own."""

    def __init__(self, split: Split, transform: v2.Transform | None) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        pixels = self.split.pixels[indices]
        if self.transform is not None:
            pixels = np.stack([self.transform(torch.from_numpy(image)).numpy() for image in pixels])
        return pixels, self.split.labels[indices]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.__getitems__([index])


class Normalize:
    """Turn a fetched batch into tensors, normalised with the contract's own function (the one serving uses)."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def __call__(self, batch: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = batch
        return torch.from_numpy(normalize(pixels, self.spec)), torch.from_numpy(labels)


def make_loader(
    split: Split, spec: InputSpec, batch_size: int, augment: Augment | None, workers: int, shuffle: bool, seed: int
) -> DataLoader:
    """Batches of `split`; under torchrun, of this rank's share of it (training.distributed.sampler)."""
    transform = build_augmentation(augment, (spec.height, spec.width)) if augment else None
    dataset = PixelDataset(split, transform)
    sampler = distributed.sampler(dataset, shuffle, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=Normalize(spec),
        generator=torch.Generator().manual_seed(seed),
        # a last training batch of one breaks batch norm
        drop_last=shuffle and len(split) // distributed.world_size() > batch_size,
    )


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """scikit-learn's "balanced" weights, n / (k * n_c); classes absent from training get weight 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


@dataclass
class Objective:
    """What the loop optimises: a loss on (model output, inputs, labels) and an optional accuracy."""

    loss: Callable[[object, torch.Tensor, torch.Tensor], torch.Tensor]
    accuracy: Callable[[object, torch.Tensor], torch.Tensor] | None = None


def classification(weights: torch.Tensor | None, label_smoothing: float = 0.0) -> Objective:
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)
    return Objective(
        loss=lambda out, x, y: criterion(out, y),
        accuracy=lambda out, y: (out.argmax(1) == y).float().mean(),
    )


def reconstruction(kind: str = "mse") -> Objective:
    """Reconstruction loss on pixels in [0, 1]; "bce" treats each pixel as a probability (sigmoid decoders)."""
    criterion = nn.BCELoss() if kind == "bce" else nn.MSELoss()

    def loss(out: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # BCE is not autocast-safe
            return criterion(out[0].float(), x.float())

    return Objective(loss=loss)


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


@dataclass
class FitResult:
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    seconds: float
    images_per_second: float
    checkpoint: Path
    device: str | None = None  # where the checkpoint was trained (an adopted one may come from another machine)


def checkpoint_file(run_dir: Path, tag: str | None = None) -> Path:
    """Where a fit keeps its best weights: best.pt, or best-<tag>.pt for a stage of a task trained in stages."""
    return run_dir / f"best{'-' + tag if tag else ''}.pt"


def history_file(checkpoint: Path) -> Path:
    """The per-epoch history written beside a checkpoint: best[-stage].pt → history[-stage].csv (prefixes kept)."""
    return checkpoint.with_name(checkpoint.stem.replace("best", "history", 1) + ".csv")


def last_file(checkpoint: Path) -> Path:
    """The state saved after every epoch beside a checkpoint, for --resume: best[-stage].pt → last[-stage].pt."""
    return checkpoint.with_name(checkpoint.name.replace("best", "last", 1))


def _pending_file(checkpoint: Path) -> Path:
    """A new best checkpoint before its epoch's last.pt is written (best.pt.pending): see fit."""
    return checkpoint.with_name(checkpoint.name + ".pending")


EARLY_STOPPING, TIME_LIMIT = "early stopping", "time limit"


@dataclass
class Progress:
    """Where a fit stands after its last finished epoch (saved in last[-stage].pt with everything else it needs)."""

    epoch: int = 0
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    best_score: float = float("-inf")  # the monitored quantity (-val_loss or val_acc): higher is better
    stale: int = 0  # epochs since the best
    last_val_loss: float = float("nan")
    images: int = 0  # training images seen, all sessions of the run together
    seconds: float = 0.0  # training and validation time of its epochs, all sessions together
    stopped_by: str = ""  # EARLY_STOPPING ends a run for good; a time limit or an interruption leaves it resumable


@dataclass
class Trainables:
    """What a fit changes as it goes, saved together after every epoch (last.pt) and restored by a resumed fit.

    The random state is saved too: the global generator draws the augmentation when there are no loader workers,
    the loader's own generator the shuffling, so that a resumed run in one process without workers ends exactly
    as an uninterrupted one (loader workers are seeded afresh, and under torchrun every rank gets rank 0's state).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    loader: DataLoader
    device: torch.device

    def state(self, progress: Progress) -> dict:
        return {
            "progress": asdict(progress),
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "loader_rng": self.loader.generator.get_state() if self.loader.generator is not None else None,
        }

    def restore(self, state: dict) -> Progress:
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])  # its tensors follow the parameters to their device
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():  # empty when saved by a disabled scaler (no AMP, a CPU)
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if state["loader_rng"] is not None and self.loader.generator is not None:
            self.loader.generator.set_state(state["loader_rng"])
        return Progress(**state["progress"])


def _save(state: dict, path: Path) -> None:
    with written_whole(path) as file:
        torch.save(state, file)


def _resume(checkpoint: Path, trainables: Trainables) -> Progress:
    """Restore last.pt into the fit's parts: where the fit stands (a fresh start if no epoch of it finished)."""
    last = last_file(checkpoint)
    if not last.exists():
        if checkpoint.exists():
            raise RuntimeError(
                f"{checkpoint} has no {last.name} beside it (trained before runs saved their state after every epoch, "
                f"or adopted): it cannot be resumed; train on from its weights with --checkpoint {checkpoint}"
            )
        log.warning("%s does not exist (no epoch of this stage finished): training it from its first epoch", last)
        return Progress()
    progress = trainables.restore(torch.load(last, map_location="cpu", weights_only=True))
    pending = _pending_file(checkpoint)
    if distributed.is_main() and pending.exists():  # stopped between a new best's two files
        if torch.load(pending, map_location="cpu", weights_only=True)["epoch"] == progress.best_epoch:
            pending.replace(checkpoint)  # its last.pt was written: the epoch counts, and so does its best
        else:
            pending.unlink()  # its epoch never finished: it will run again
    return progress


def _run_epoch(model, loader, objective, device, optimizer=None, scaler=None, amp=False, channels_last=False, desc=""):
    training = optimizer is not None
    model.train(training)
    total_loss = total_acc = count = 0.0
    bar = tqdm(loader, desc=desc, leave=False, unit="batch", disable=not distributed.is_main())
    with torch.set_grad_enabled(training):
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=amp):
                out = model(x)
                loss = objective.loss(out, x, y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            n = len(y)
            total_loss += loss.item() * n
            if objective.accuracy is not None:
                total_acc += objective.accuracy(out, y).item() * n
            count += n
            bar.set_postfix(loss=f"{total_loss / count:.4f}")
    total_loss, total_acc, count = distributed.all_reduce_sums([total_loss, total_acc, count], device)
    return total_loss / count, (total_acc / count if objective.accuracy else float("nan")), int(count)


def _out_of_time(recipe: Recipe, elapsed: float, last_epoch: float, device: torch.device) -> bool:
    """Whether one more epoch as long as the last would end past the time limit; under torchrun, if any rank says so
    (their clocks differ a little, their decisions must not)."""
    if not recipe.time_limit_minutes:
        return False
    late = float(elapsed + last_epoch > recipe.time_limit_minutes * 60)
    return distributed.all_reduce_sums([late], device)[0] > 0


class EpochLog:
    """Where each epoch is recorded, on rank 0 only: `history*.csv` (flushed every epoch, so a stopped run keeps it),
    TensorBoard when asked for, and one console line."""

    COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")

    def __init__(
        self, history: Path, tensorboard_dir: Path | None, tag: str | None, enabled: bool, kept_epochs: int = 0
    ) -> None:
        """`kept_epochs`: a resumed run's rows up to that epoch stay (those of an epoch it did not finish go)."""
        self.tag, self.enabled = tag, enabled
        if enabled:
            kept = []
            if kept_epochs and history.exists():
                with open(history, newline="") as handle:
                    kept = [row for row in list(csv.reader(handle))[1:] if int(row[0]) <= kept_epochs]
            with written_whole(history, "w", newline="") as file:  # a kill now keeps the old rows
                csv.writer(file).writerows([self.COLUMNS, *kept])
        self._file = open(history if enabled else os.devnull, "a", newline="")  # noqa: SIM115 (closed by close())
        self._history = csv.writer(self._file)
        self._tensorboard = None
        if tensorboard_dir is not None and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(tensorboard_dir)

    def record(self, epoch: int, lr: float, train: tuple[float, float], val: tuple[float, float], seconds: float,
               improved: bool) -> None:  # fmt: skip
        (train_loss, train_acc), (val_loss, val_acc) = train, val
        self._history.writerow([epoch, f"{lr:.3g}", f"{train_loss:.5f}", f"{train_acc:.4f}", f"{val_loss:.5f}",
                                f"{val_acc:.4f}", f"{seconds:.1f}"])  # fmt: skip
        self._file.flush()
        if self._tensorboard is not None:
            scalars = {"loss/train": train_loss, "loss/val": val_loss, "acc/train": train_acc, "acc/val": val_acc}
            for name, value in (scalars | {"lr": lr}).items():
                self._tensorboard.add_scalar(name, value, epoch)
        self.note(
            f"{self.tag or 'epoch'} {epoch:3d}  lr {lr:.2e}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}  {seconds:.0f}s{'  *best' if improved else ''}"
        )

    def note(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def fit(
    model: nn.Module,
    train: DataLoader,
    val: DataLoader,
    objective: Objective,
    recipe: Recipe,
    device: torch.device,
    run_dir: Path,
    *,
    amp: bool = False,
    channels_last: bool = False,
    tensorboard: bool = False,
    tag: str | None = None,
    resume: bool = False,
) -> FitResult:
    """Train with checkpoint-best on validation loss (or accuracy, ``recipe.monitor``), reduce-LR-on-plateau and
    early stopping; log every epoch.

    After every epoch ``last[-tag].pt`` holds all that training needs to go on (weights, optimizer, learning-rate
    schedule, early-stopping counters, random state). With ``resume`` the fit continues from it, after its last
    finished epoch, up to ``recipe.epochs``; a fit that stopped early is finished and only loads its best weights.
    ``recipe.time_limit_minutes`` counts this session's time.

    Under torchrun the model trains inside DistributedDataParallel; every rank takes the same decisions from the
    summed epoch totals, only rank 0 writes history and checkpoints, and every rank ends with rank 0's best weights.
    """
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = distributed.wrap(model, device)
    main = distributed.is_main()
    amp = amp and device.type == "cuda"
    optimizer = make_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=recipe.plateau_factor,
        patience=recipe.plateau_patience,
        threshold=recipe.plateau_threshold,
        min_lr=recipe.min_lr,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    if recipe.monitor == "val_acc" and objective.accuracy is None:
        raise ValueError("--recipe monitor=val_acc needs a classifier; this objective has no accuracy")
    checkpoint = checkpoint_file(run_dir, tag)
    trainables = Trainables(model, optimizer, scheduler, scaler, train, device)
    progress = _resume(checkpoint, trainables) if resume else Progress()
    log = EpochLog(
        history_file(checkpoint),
        run_dir / "tensorboard" / (tag or "") if tensorboard else None,
        tag,
        enabled=main,
        kept_epochs=progress.epoch,
    )
    first = progress.epoch + 1
    if progress.epoch:
        done = progress.stopped_by == EARLY_STOPPING or first > recipe.epochs
        log.note(f"{tag or 'training'} resumed after epoch {progress.epoch}{': nothing more to train' if done else ''}")
        if done:
            first = recipe.epochs + 1
    started = time.perf_counter()
    try:
        for epoch in range(first, recipe.epochs + 1):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            distributed.set_epoch(train, epoch)
            desc = f"{tag or 'train'} epoch {epoch}/{recipe.epochs}"
            tr_loss, tr_acc, n = _run_epoch(
                net, train, objective, device, optimizer, scaler, amp, channels_last, desc=desc
            )
            va_loss, va_acc, _ = _run_epoch(
                model, val, objective, device, amp=amp, channels_last=channels_last, desc="validate"
            )
            seconds = time.perf_counter() - t0
            progress.epoch, progress.last_val_loss = epoch, va_loss
            progress.images += n
            progress.seconds += seconds
            score = va_acc if recipe.monitor == "val_acc" else -va_loss
            improved = score > progress.best_score + 1e-6
            if improved:
                progress.best_score, progress.best_val_loss, progress.best_epoch = score, va_loss, epoch
                progress.stale = 0
                if main:  # best.pt once this epoch's last.pt is written (below), so that the two always agree
                    best = {
                        "state_dict": model.state_dict(),
                        "epoch": epoch,
                        "val_loss": va_loss,
                        "device": str(device),
                    }
                    _save(best, _pending_file(checkpoint))
            else:
                progress.stale += 1
            log.record(epoch, lr, (tr_loss, tr_acc), (va_loss, va_acc), seconds, improved)
            scheduler.step(va_loss)
            if progress.stale >= recipe.early_stopping_patience:
                progress.stopped_by = EARLY_STOPPING
            elif epoch < recipe.epochs and _out_of_time(recipe, time.perf_counter() - started, seconds, device):
                progress.stopped_by = TIME_LIMIT
            else:
                progress.stopped_by = ""  # a time limit of an earlier session no longer holds
            if main:
                _save(trainables.state(progress), last_file(checkpoint))
                if improved:
                    _pending_file(checkpoint).replace(checkpoint)
            if progress.stopped_by == EARLY_STOPPING:
                log.note(f"early stopping: no {recipe.monitor} improvement for {progress.stale} epochs")
                break
            if progress.stopped_by == TIME_LIMIT:
                log.note(f"time limit: another epoch would end past {recipe.time_limit_minutes:g} minutes")
                break
    finally:
        log.close()
    if progress.best_epoch == 0:  # every validation loss was NaN (or infinite): nothing to evaluate or export
        raise RuntimeError(
            f"no epoch of {progress.epoch} gave a finite validation {recipe.monitor.removeprefix('val_')} (last loss "
            f"{progress.last_val_loss}): the training diverged; try a lower --lr"
        )
    if main:
        model.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=True)["state_dict"])
    distributed.broadcast_state(model)
    return FitResult(
        progress.best_epoch,
        progress.best_val_loss,
        progress.epoch,
        progress.seconds,
        progress.images / progress.seconds if progress.seconds else 0.0,
        checkpoint,
        str(device),
    )


def adopt_checkpoint(
    model: nn.Module, checkpoint: Path, run_dir: Path, device: torch.device, prefix: str = ""
) -> FitResult:
    """Take an earlier run's best checkpoint (and its history) as this run's result, without training.

    ``training.run --checkpoint PATH --epochs 0`` uses this to evaluate and export a run that was stopped early.
    The checkpoint keeps its file name (``best.pt``, ``best-<stage>.pt``) behind `prefix` (ensemble members:
    ``member1-best.pt``, ...) and brings its ``history[-<stage>].csv`` (and a member its run's ``config.json``) under
    the same prefix.
    """
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    model.load_state_dict(state["state_dict"])
    model.to(device)
    target = run_dir / f"{prefix}{checkpoint.name}"
    shutil.copyfile(checkpoint, target)
    seconds, epochs_run = 0.0, state["epoch"]
    source_history = history_file(checkpoint)
    if source_history.exists():  # the run's epochs and time, past its best epoch too
        shutil.copyfile(source_history, history_file(target))
        with open(source_history) as handle:
            rows = list(csv.DictReader(handle))
        seconds, epochs_run = sum(float(r["seconds"]) for r in rows), len(rows)
    if prefix and checkpoint.with_name("config.json").exists():  # an ensemble member's own recipe, for the record
        shutil.copyfile(checkpoint.with_name("config.json"), run_dir / f"{prefix}config.json")
    return FitResult(state["epoch"], state["val_loss"], epochs_run, seconds, 0.0, target, state.get("device"))


@torch.no_grad()
def predict(
    model: nn.Module, pixels: np.ndarray, spec: InputSpec, device: torch.device, batch_size: int = 256
) -> np.ndarray:
    """Model outputs for cached uint8 pixels, normalised by the contract (softmax probabilities for classifiers)."""
    model.eval().to(device)
    outputs = []
    for start in range(0, len(pixels), batch_size):
        x = torch.from_numpy(normalize(pixels[start : start + batch_size], spec)).to(device)
        out = model(x)
        outputs.append((out[0] if isinstance(out, tuple) else out.softmax(1)).float().cpu().numpy())
    return np.concatenate(outputs)
