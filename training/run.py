"""Train one task end to end: data → training → held-out evaluation → report → verified ONNX in models/.

python -m training.run chest_xray --data ../shared/datasets/chest_xray
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import json
import logging
import re
import sys
import time
import typing
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from contract.card import MODEL_NAME_PATTERN
from contract.cli import HelpFormatter
from contract.preprocessing import normalize
from training import architectures, distributed, tasks
from training.architectures import count_parameters, create_model, model_options
from training.architectures.autoencoder import CodeClassifier
from training.data import DataError, Dataset, load_dataset
from training.engine import (
    FitResult,
    Objective,
    adopt_checkpoint,
    balanced_class_weights,
    checkpoint_file,
    classification,
    fit,
    history_file,
    make_loader,
    predict,
    reconstruction,
)
from training.ensemble import Ensemble, Resized
from training.evaluate import (
    choose_threshold,
    held_out_metrics,
    plot_history,
    plot_reconstructions,
    plot_test_results,
)
from training.explain import EXPLANATION_OUTPUT, classifier_graph, explanation_info
from training.export import (
    ExportError,
    export_onnx,
    publish,
    replacement_problem,
    round_weights_to_half,
    store_weights_in_half,
    verify_parity,
)
from training.files import sole_writer
from training.mirror import MirrorAveraged
from training.task_files import FOLDER_LAYOUT, TASK_HELP, resolve_task, task_argument
from training.tasks import Augment, Recipe, TaskSpec

log = logging.getLogger("training")
REPORT_FILES = (
    "metrics.json",
    "config.json",
    "history.csv",
    "curves.png",
    "roc.png",
    "pr.png",
    "confusion.png",
    "history-autoencoder.csv",
    "curves-autoencoder.png",
    "reconstructions.png",
)


@dataclass
class RunConfig:
    task: str
    data: str
    arch: str
    arch_options: dict
    pretrained: bool
    image_size: int
    epochs: int
    batch_size: int
    lr: float
    seed: int
    device: str
    workers: int
    amp: bool
    channels_last: bool
    augment: bool
    name: str
    models_dir: str
    runs_dir: str
    cache_dir: str
    export: bool
    version: str | None
    tensorboard: bool
    checkpoints: list[str]  # --checkpoint: start from the first; with --epochs 0 adopt it, or ensemble several
    mirror_average: bool
    half_weights: bool  # store the ONNX weights in float16 (rounded before evaluation, computed in float32)
    recipe: dict  # the whole recipe and augmentation, so a card says exactly how its model was trained
    augmentation: dict | None  # None: --no-augment
    task_spec: dict  # the task as trained (TaskSpec.as_dict): rebuilds its splits later, from a task file too
    data_fingerprint: str = ""  # the splits' (Dataset.fingerprint): a resumed run must find the same ones
    resumes: int = 0  # how many times --resume continued this run


# what --resume takes besides the run folder: where things are on this machine, and how much more to train
RESUME_OPTIONS = ("data", "epochs", "time_limit", "device", "workers", "cache_dir", "out", "version", "no_export")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.resume is None and (args.task is None or args.data is None):
        parser.error("a run needs TASK and --data (or --resume RUN_FOLDER to continue one)")
    args.given = _given_options(parser, argv)
    if args.resume is not None and (fixed := sorted(args.given - {"resume", *RESUME_OPTIONS})):
        flags = {action.dest: (action.option_strings or [action.metavar])[0] for action in parser._actions}
        parser.error(
            f"--resume continues a run with the settings in its config.json: {', '.join(flags[d] for d in fixed)} "
            f"cannot change (--resume takes {', '.join(flags[d] for d in RESUME_OPTIONS)})"
        )
    return args


def _given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The options on the command line, whatever their values (equal to a default or not): the parser parses again
    with no defaults (argparse offers no public list of a parser's actions; ``_actions`` is the long-stable one)."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        if action.option_strings:  # an optional positional's default is converted by its type: TASK keeps None
            action.default = argparse.SUPPRESS
    return {dest for dest, value in vars(probe.parse_args(argv)).items() if value is not None}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.run",
        description="Train one task end to end: load the dataset, augment, train with checkpoint-best, reduce-LR-on-"
        "plateau and early stopping, evaluate on a held-out test split (metrics and plots in the run folder), and "
        "export the best checkpoint to ONNX, verified against PyTorch, into the model repository with a model card.",
        epilog="Options shown without a default take the task's (its spec and recipe in training/tasks.py, or its "
        "task file). Tasks: "
        + "; ".join(f"{t.name}: {t.data_hint}" for t in tasks.TASKS.values())
        + f"; a task file's: {FOLDER_LAYOUT}"
        + ". Architectures: "
        + ", ".join(architectures.list_models())
        + ".",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("task", nargs="?", type=task_argument, metavar="TASK", help=TASK_HELP)
    parser.add_argument("--data", type=Path, help="dataset root (layout per task, see below); required unless --resume")
    parser.add_argument("--arch", help="architecture (default: the task's)", choices=architectures.list_models())
    parser.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start from ImageNet weights (default: the task's choice)",
    )
    parser.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="MINUTES",
        help="wall-clock budget for training: no epoch is started that would end past it at the last epoch's pace; "
        "the best checkpoint so far is then evaluated and exported as usual (autoencoder tasks: per stage; a resumed "
        "run: per session)",
    )
    parser.add_argument("--batch-size", type=int, help="batch size")
    parser.add_argument("--lr", type=float, help="initial learning rate")
    parser.add_argument(
        "--reconstruction-loss",
        choices=["mse", "bce"],
        help="autoencoder tasks: training loss (the test split is scored by MSE either way)",
    )
    parser.add_argument(
        "--class-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="weight the loss by inverse class frequency, n / (k * n_c) (default: the task's choice)",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one training-recipe setting of the task (optimizer, weight_decay, plateau_patience, "
        "early_stopping_patience, min_lr, ...), e.g. --recipe plateau_patience=8; repeatable",
    )
    parser.add_argument(
        "--label-smoothing", type=float, help="classifiers: share of the target spread over all classes (0 disables)"
    )
    parser.add_argument(
        "--mirror-average",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="classifiers: evaluate and export the mean prediction of the image and its left-right mirror "
        "(twice the inference cost; default: the task's choice)",
    )
    parser.add_argument("--image-size", type=int, help="square input size in pixels (default: the task's)")
    parser.add_argument("--no-augment", action="store_true", help="train without augmentation")
    parser.add_argument(
        "--augment",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one augmentation setting of the task "
        f"({', '.join(f.name for f in dataclasses.fields(Augment))}), "
        "e.g. --augment right_angles=true --augment rotation=0; repeatable",
    )
    parser.add_argument("--dropout", type=float, help="dropout rate, for architectures that take it (0 disables)")
    parser.add_argument("--init", choices=["glorot", "zeros", "ones", "default"], help="weight initialiser")
    parser.add_argument("--depth", type=int, help="number of conv blocks, for architectures that take it")
    parser.add_argument("--width", type=float, help="width multiplier / base filters, for architectures that take it")
    parser.add_argument(
        "--freeze",
        type=float,
        help="fraction of a pretrained backbone's parameter tensors to freeze, first layers first (0..1); chest_xray "
        "with --freeze 0.2 reached its quality target in 11 minutes on 2 CPU cores instead of 19 (docs/performance.md)",
    )
    parser.add_argument("--val-fraction", type=float, help="share of all images carved out for validation")
    parser.add_argument("--test-fraction", type=float, help="share of all images carved out for testing")
    parser.add_argument(
        "--fold",
        type=fold_argument,
        metavar="K/N",
        help="cross-validation: test on the K-th of N stratified folds of all the images (every split given pooled; "
        "a group_pattern's groups kept whole), carve validation from the rest, and do not export: the fold's model "
        "measures the recipe. training.compare --folds N runs all N and sums them up",
    )
    parser.add_argument(
        "--min-sensitivity", type=float, help="binary tasks: threshold = highest with this validation sensitivity"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="automatic mixed precision (CUDA only); off by default because it measured 0.7-0.85x for "
        "EfficientNet-Lite0 at batch 32 on an H100 (small, launch-bound steps; docs/performance.md): turn it on "
        "for large models and batches",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels-last (NHWC) memory format; measured 1.3-1.75x faster training steps on CPU for the "
        "EfficientNet, MobileNet, VGG-like and compact CNNs (docs/performance.md)",
    )
    parser.add_argument("--workers", type=int, default=1, help="data-loader worker processes for augmentation")
    parser.add_argument("--seed", type=int, default=0, help="seed for splits, initialisation and augmentation")
    parser.add_argument("--name", help="model name in the repository (default: the task name)")
    parser.add_argument("--out", type=Path, default=Path("models"), help="model repository to publish into")
    parser.add_argument("--version", help="model version to write (default: next integer)")
    parser.add_argument("--no-export", action="store_true", help="evaluate only; do not publish to the repository")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run folders (reports) go")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="decoded-image cache")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        help="start from this best.pt (weights only); with --epochs 0, evaluate and export it without training. "
        "Several, with --epochs 0: evaluate and export their ensemble (the mean of their probabilities; each member "
        "built as its run's config.json says, a member of another input size fed a resized input inside the graph). "
        "Autoencoder tasks: a run's best-autoencoder.pt, with --epochs 0; its "
        "classifier checkpoints are read from the same folder",
    )
    parser.add_argument(
        "--half-weights",
        action="store_true",
        help="classifiers: store the exported weights in float16, half the file (an ensemble of four Lite0 takes "
        "33 MB instead of 57); they are rounded before evaluation and inference still computes in float32",
    )
    parser.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard in the run folder")
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_FOLDER",
        help="continue a run that was interrupted or stopped by its time limit, in its own folder (runs/<name>/"
        "<date-time>), after its last finished epoch: its config.json gives every setting and its last.pt, saved "
        "after every epoch, the weights, optimizer, learning-rate schedule, early-stopping counters and random state, "
        "so that in one process without loader workers (--workers 0) it ends as the uninterrupted run would have. "
        "Only where things are and how much more to train may change: --data (the same images: checked), --epochs "
        "(a new total), --time-limit (from this session on), --device, --workers, --cache-dir, --out, --version, "
        "--no-export. A run that stopped early is finished; a task trained in stages (mnist) goes on from the stage "
        "that was running, the earlier ones final",
    )
    return parser


def fold_argument(text: str) -> tuple[int, int]:
    """``"2/5"`` → (2, 5); TaskSpec checks the range."""
    k, slash, n = text.partition("/")
    if not (slash and k.isdigit() and n.isdigit()):
        raise argparse.ArgumentTypeError(f"a fold is K/N, such as 2/5 (the second of five); got {text!r}")
    return int(k), int(n)


def parse_settings(flag: str, target: type, settings: list[str]) -> dict:
    """``["rotation=10", "hflip=false"]`` → overrides of the dataclass ``target``, typed by its annotations."""
    types = typing.get_type_hints(target)
    overrides = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        if key not in types or not value:
            raise ValueError(f"{flag} takes KEY=VALUE with KEY one of {sorted(types)}; got {setting!r}")
        kind = types[key]
        if kind is bool:
            overrides[key] = value.lower() in ("1", "true", "yes", "on")
        elif kind in (int, float):
            try:
                overrides[key] = kind(value)
            except ValueError:
                number = "an integer" if kind is int else "a number"
                raise ValueError(f"{flag} {key} takes {number}; got {value!r}") from None
        elif typing.get_origin(kind) is typing.Literal and value not in typing.get_args(kind):
            raise ValueError(f"{flag} {key} must be one of {list(typing.get_args(kind))}; got {value!r}")
        else:
            overrides[key] = value
    return overrides


def resolve(args: argparse.Namespace) -> tuple[TaskSpec, RunConfig]:
    if args.resume is not None:
        return resolve_resumed(args)
    spec = resolve_task(args.task)
    recipe_changes = parse_settings("--recipe", Recipe, args.recipe)
    recipe_changes.update(
        {
            k: v
            for k, v in (
                ("epochs", args.epochs),
                ("time_limit_minutes", args.time_limit),
                ("batch_size", args.batch_size),
                ("lr", args.lr),
                ("reconstruction_loss", args.reconstruction_loss),
                ("class_weights", args.class_weights),
                ("label_smoothing", args.label_smoothing),
            )
            if v is not None
        },
    )
    recipe = replace(spec.recipe, **recipe_changes)
    changes: dict = {"recipe": recipe}
    if args.image_size:
        changes["input"] = spec.input.model_copy(update={"height": args.image_size, "width": args.image_size})
    for field_name in ("val_fraction", "test_fraction", "min_sensitivity"):
        if getattr(args, field_name) is not None:
            changes[field_name] = getattr(args, field_name)
    if args.fold is not None:
        changes["test_fold"] = args.fold
    if args.mirror_average is not None:
        changes["mirror_average"] = args.mirror_average
    if args.augment:
        changes["augment"] = replace(spec.augment, **parse_settings("--augment", Augment, args.augment))
    if args.name and not re.fullmatch(MODEL_NAME_PATTERN, args.name):  # said now, not at the export
        raise ValueError(
            f"--name {args.name!r}: a model's name is lower-case letters, digits and _ (its folder, routes)"
        )
    spec = spec.with_overrides(**changes)
    if spec.test_fold is not None and args.test_fraction is not None:
        raise ValueError("a test fold (--fold K/N) is a fold of all the images: --test-fraction has no part in it")
    arch = args.arch or spec.arch
    options = dict(spec.arch_options) if arch == spec.arch else {}
    for option in ("dropout", "init", "depth", "width", "freeze"):
        value = getattr(args, option)
        if value is not None:
            options[option] = value
    unknown = sorted(set(options) - set(model_options(arch)))
    if unknown:  # said now, not after the dataset has been decoded
        takes = ", ".join(f"--{o}" for o in model_options(arch)) or "none of them"
        raise ValueError(f"--arch {arch} has no option --{unknown[0]}; it takes {takes}")
    # another architecture than the task's starts from scratch unless --pretrained says otherwise
    pretrained = (spec.pretrained and arch == spec.arch) if args.pretrained is None else args.pretrained
    config = RunConfig(
        task=spec.name,
        data=str(args.data),
        arch=arch,
        arch_options=options,
        pretrained=pretrained,
        image_size=spec.input.height,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=args.seed,
        device=_device(args.device),
        workers=args.workers,
        amp=args.amp,
        channels_last=args.channels_last,
        augment=not args.no_augment,
        name=args.name or spec.name,
        models_dir=str(args.out),
        runs_dir=str(args.runs_dir),
        cache_dir=str(args.cache_dir),
        export=not args.no_export and spec.test_fold is None,  # a fold's model measures the recipe: not served
        version=args.version,
        tensorboard=args.tensorboard,
        checkpoints=[str(path) for path in args.checkpoint or []],
        mirror_average=spec.mirror_average,
        half_weights=args.half_weights,
        recipe=asdict(recipe),
        augmentation=None if args.no_augment else asdict(spec.augment),
        task_spec=spec.as_dict(),
    )
    if config.half_weights and spec.kind != "classifier":
        raise ValueError("--half-weights is for classifiers")
    if config.epochs == 0 and not config.checkpoints:
        raise ValueError("--epochs 0 evaluates and exports a --checkpoint: name one, or train at least one epoch")
    if len(config.checkpoints) > 1 and config.epochs != 0:
        raise ValueError("several --checkpoint files make an ensemble, evaluated and exported, not trained: --epochs 0")
    return spec, config


def _device(choice: str) -> str:
    return choice if choice != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_resumed(args: argparse.Namespace) -> tuple[TaskSpec, RunConfig]:
    """--resume RUN_FOLDER: the run's own settings (its config.json), with those of RESUME_OPTIONS given again."""
    recorded = args.resume / "config.json"
    if not recorded.is_file():
        raise ValueError(f"--resume {args.resume}: no config.json there; name a run's folder, runs/<name>/<date-time>")
    try:
        config = RunConfig(**json.loads(recorded.read_text()))
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{recorded} is not a config.json this training.run can resume ({error})") from None
    if config.epochs == 0:  # it adopted checkpoints (--epochs 0) and trained nothing (a resumed run never has 0)
        raise ValueError(f"--resume {args.resume}: that run trained nothing (--epochs 0): nothing to resume")
    if args.epochs == 0:
        raise ValueError(
            "--resume trains on; to evaluate and export a run's best weights as they are: python -m training.run "
            f"{config.task} --data {config.data} --checkpoint {args.resume}/best.pt --epochs 0 (and its other options)"
        )
    spec = TaskSpec.from_dict(config.task_spec, origin=str(recorded))
    more = {k: v for k, v in (("epochs", args.epochs), ("time_limit_minutes", args.time_limit)) if v is not None}
    spec = spec.with_overrides(recipe=replace(spec.recipe, **more))
    options = (  # (option, the RunConfig field it sets, its value): those given again replace the recorded ones
        ("data", "data", str(args.data)),
        ("device", "device", _device(args.device)),
        ("workers", "workers", args.workers),
        ("cache_dir", "cache_dir", str(args.cache_dir)),
        ("out", "models_dir", str(args.out)),
        ("version", "version", args.version),
        ("no_export", "export", not args.no_export),
    )
    changes = {field: value for option, field, value in options if option in args.given}
    return spec, replace(
        config,
        **changes,
        epochs=spec.recipe.epochs,
        recipe=asdict(spec.recipe),
        task_spec=spec.as_dict(),
        resumes=config.resumes + 1,
    )


def _card_fields(
    spec: TaskSpec,
    config: RunConfig,
    data: Dataset,
    model,
    metrics: dict,
    kind: str,
    name: str,
    classes: list[str],
    threshold: float | None,
    rule: str | None,
    arch: str,
) -> dict:
    return dict(
        name=name,
        kind=kind,
        task=spec.name,
        description=spec.description,
        intended_input=spec.intended_input,
        limitations=list(spec.limitations),
        classes=classes,
        positive_class=spec.positive_class if threshold is not None else None,
        threshold=threshold,
        threshold_rule=rule,
        input=spec.input,
        architecture=arch,
        parameters=count_parameters(model),
        metrics=metrics,
        splits=data.sizes(),
        dataset={
            "fingerprint": data.fingerprint,
            "source": spec.data_hint,
            "notes": data.notes,
            "class_counts": {s: data.class_counts(s) for s in data.splits},
        },
        training=asdict(config) | _adopted_runs(config),
    )


def _adopted_runs(config: RunConfig) -> dict:
    """With --epochs 0 the weights come from earlier runs: their own settings (config.json beside each checkpoint)
    are what trained the model, so the card keeps them, not only this export's."""
    if config.epochs or not config.checkpoints:
        return {}
    configs = [Path(path).with_name("config.json") for path in config.checkpoints]
    return {"trained_by": [json.loads(c.read_text()) if c.exists() else None for c in configs]}


def _refuse_replacing(spec: TaskSpec, config: RunConfig, data: Dataset) -> None:
    """ExportError if a model this run publishes would replace one of another kind or class set, or (--version) a
    version that exists: said before training. Rank 0 reads the repository, every rank gets its answer: under
    torchrun they must stop together or not at all."""
    published = [(config.name, "classifier", data.classes)]
    if spec.kind == "autoencoder":
        published.append((f"{config.name}_autoencoder", "autoencoder", []))
    problems = []
    if distributed.is_main():
        models = Path(config.models_dir)
        if config.version is None:
            problems = [replacement_problem(models, *model) for model in published]
        else:
            taken = [models / name / config.version for name, _, _ in published]
            problems = [
                f"{folder} already exists; pass another --version or remove it" for folder in taken if folder.exists()
            ]
    problem = next(filter(None, distributed.broadcast(problems)), None)
    if problem:
        raise ExportError(problem)


def _loaders(spec: TaskSpec, config: RunConfig, data: Dataset) -> tuple[DataLoader, DataLoader]:
    """Shuffled, augmented training batches and plain validation batches, both normalised by the contract."""
    augment = spec.augment if config.augment else None
    train = make_loader(data.splits["train"], spec.input, config.batch_size, augment, config.workers, True, config.seed)
    val = make_loader(data.splits["val"], spec.input, 256, None, 0, False, config.seed)
    return train, val


def train_classifier(spec: TaskSpec, config: RunConfig, data: Dataset, run_dir: Path, device: torch.device) -> dict:
    k = len(data.classes)
    model = create_model(
        config.arch,
        in_chans=spec.input.channels,
        num_classes=k,
        image_size=spec.input.height,
        pretrained=config.pretrained,
        **config.arch_options,
    )
    log.info("%s: %s with %s parameters, %s", spec.name, config.arch, f"{count_parameters(model):,}", data.sizes())
    weights = balanced_class_weights(data.splits["train"].labels, k) if spec.recipe.class_weights else None
    train, val = _loaders(spec, config, data)
    if config.checkpoints and config.epochs == 0:
        model, result, arch = adopt_members(model, spec, config, k, run_dir, device)
        return finish_classifier(spec, config, data, run_dir, device, model, result, config.name, arch)
    if config.checkpoints:  # the starting weights; a resumed run's last.pt, if it has one, replaces them
        state = torch.load(config.checkpoints[0], map_location="cpu", weights_only=True)
        model.load_state_dict(state["state_dict"])
    result = fit(
        model,
        train,
        val,
        classification(weights.to(device) if weights is not None else None, spec.recipe.label_smoothing),
        spec.recipe,
        device,
        run_dir,
        amp=config.amp,
        channels_last=config.channels_last,
        tensorboard=config.tensorboard,
        resume=config.resumes > 0,
    )
    return finish_classifier(spec, config, data, run_dir, device, model, result, config.name, config.arch)


def adopt_members(
    model: nn.Module, spec: TaskSpec, config: RunConfig, num_classes: int, run_dir: Path, device: torch.device
) -> tuple[nn.Module, FitResult, str]:
    """--checkpoint ... --epochs 0: the one checkpoint's model, or the ensemble of several; with its result and arch.

    Each member is built as its own run built it (architecture, options, input size: the run's config.json beside the
    checkpoint; this run's settings where there is none). A member trained at another (square) input size than this
    run's is wrapped in :class:`~training.ensemble.Resized`, which resizes the ensemble's input to it in the graph.
    """
    if len(config.checkpoints) == 1:
        return model, adopt_checkpoint(model, Path(config.checkpoints[0]), run_dir, device), config.arch
    size = (spec.input.height, spec.input.width)
    members, results, archs, notes = [], [], [], []
    for index, path in enumerate(map(Path, config.checkpoints), start=1):
        arch, options, trained = _member_build(path, config)
        member = create_model(
            arch, in_chans=spec.input.channels, num_classes=num_classes, image_size=trained, pretrained=False, **options
        )
        results.append(adopt_checkpoint(member, path, run_dir, device, prefix=f"member{index}-"))
        archs.append(arch)
        if options != config.arch_options:
            notes.append(f"member {index} with {', '.join(f'{k}={v}' for k, v in sorted(options.items()))}")
        if (trained, trained) != size:
            member = Resized(member, trained, trained)
            notes.append(f"member {index} trained at {trained} px, its input resized in the graph")
        members.append(member)
    same = len(set(archs)) == 1
    description = f"ensemble of {len(archs)} x {archs[0]}" if same else f"ensemble of {' + '.join(archs)}"
    description = "; ".join([description, *notes])
    log.info("%s", description)
    result = replace(results[0], seconds=sum(r.seconds for r in results))
    return Ensemble(members), result, description


def _member_build(checkpoint: Path, config: RunConfig) -> tuple[str, dict, int]:
    """How a checkpoint's run built its model: architecture, options and input size, from the run's config.json."""
    path = checkpoint.with_name("config.json")
    run = json.loads(path.read_text()) if path.exists() else {}
    return (
        run.get("arch", config.arch),
        run.get("arch_options", config.arch_options),
        run.get("image_size", config.image_size),
    )


def finish_classifier(
    spec: TaskSpec,
    config: RunConfig,
    data: Dataset,
    run_dir: Path,
    device: torch.device,
    model: nn.Module,
    result: FitResult,
    name: str,
    arch: str,
    extra_test_metrics: dict | None = None,
) -> dict:
    """Threshold on validation, metrics and plots on test, export and publish (rank 0 only under torchrun)."""
    if not distributed.is_main():
        return {}
    if config.half_weights:
        round_weights_to_half(model)
    if spec.mirror_average:
        model = MirrorAveraged(model)
    classes = data.classes
    val_probs = predict(model, data.splits["val"].pixels, spec.input, device)
    started = time.perf_counter()
    test_probs = predict(model, data.splits["test"].pixels, spec.input, device)
    ms_per_image = (time.perf_counter() - started) * 1000 / max(len(test_probs), 1)
    positive = classes.index(spec.positive_class) if spec.positive_class in classes and len(classes) == 2 else None
    threshold = rule = None
    if positive is not None:
        threshold, rule = choose_threshold(
            data.splits["val"].labels == positive, val_probs[:, positive], spec.min_sensitivity
        )
    test_labels = data.splits["test"].labels
    val_labels = data.splits["val"].labels
    metrics = held_out_metrics(val_labels, val_probs, test_labels, test_probs, classes, positive, threshold)
    metrics |= {
        "training": {
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "best_val_loss": result.best_val_loss,
            "seconds": round(result.seconds, 1),
            "train_images_per_second": round(result.images_per_second, 1),
            "device": result.device or str(device),
            "train_accuracy": _train_accuracy_at(result),
            "parameters": count_parameters(model),
            "ms_per_image": round(ms_per_image, 3),
        },
    }
    metrics["test"].update(extra_test_metrics or {})
    plot_history(
        history_file(result.checkpoint),
        run_dir / "curves.png",
        name,
    )
    plot_test_results(test_labels, test_probs, classes, positive, metrics, run_dir, name)
    fields = _card_fields(spec, config, data, model, metrics, "classifier", name, classes, threshold, rule, arch)
    _write_report(run_dir, fields, metrics)
    if config.export:
        inputs = torch.from_numpy(normalize(data.splits["val"].pixels[:128], spec.input))
        module, outputs = classifier_graph(model.cpu(), len(classes), inputs)
        _export_and_publish(module, outputs, spec, config, data, run_dir, fields)
    return metrics


STAGES = ("autoencoder", None, "finetune")  # train_autoencoder's stages in order, by tag


def train_autoencoder(spec: TaskSpec, config: RunConfig, data: Dataset, run_dir: Path, device: torch.device) -> dict:
    """Two stages: the autoencoder (MSE), then a classifier on its frozen code. Exports both models.

    With ``--checkpoint <run>/best-autoencoder.pt --epochs 0`` every stage adopts that run's checkpoint of the same
    name instead of training, so a finished run can be evaluated and exported again.
    """
    k = len(data.classes)
    autoencoder = create_model(
        config.arch, in_chans=spec.input.channels, num_classes=k, image_size=spec.input.height, **config.arch_options
    )
    train, val = _loaders(spec, config, data)
    if config.checkpoints and (config.epochs or len(config.checkpoints) > 1):
        raise ValueError("autoencoder tasks take one --checkpoint, with --epochs 0 (evaluate and export a run)")
    source = Path(config.checkpoints[0]).parent if config.checkpoints else None

    def stage(model: nn.Module, objective: Objective, recipe: Recipe, tag: str | None = None) -> FitResult:
        if source is not None:
            return adopt_checkpoint(model, checkpoint_file(source, tag), run_dir, device)
        later = STAGES[STAGES.index(tag) + 1 :]
        if config.resumes and any(history_file(checkpoint_file(run_dir, t)).exists() for t in later):
            recipe = replace(recipe, epochs=0)  # a later stage started from this one's best: this one is final
        return fit(
            model,
            train,
            val,
            objective,
            recipe,
            device,
            run_dir,
            amp=config.amp,
            tensorboard=config.tensorboard,
            tag=tag,
            resume=config.resumes > 0,
        )

    stage1 = stage(autoencoder, reconstruction(spec.recipe.reconstruction_loss), spec.recipe, "autoencoder")
    if distributed.is_main():
        name = f"{config.name} autoencoder"
        plot_history(run_dir / "history-autoencoder.csv", run_dir / "curves-autoencoder.png", name)

    classifier = CodeClassifier(copy.deepcopy(autoencoder.encoder), autoencoder.code_size, k)
    for param in classifier.encoder.parameters():
        param.requires_grad_(False)
    stage2 = stage(classifier, classification(None), spec.recipe)
    arch, extra = f"{config.arch}+code_classifier", {}
    if spec.recipe.finetune_epochs:
        frozen_probs = predict(classifier, data.splits["test"].pixels, spec.input, device)
        extra["frozen_encoder_accuracy"] = float((frozen_probs.argmax(1) == data.splits["test"].labels).mean())
        log.info(
            "classifier on the frozen code: test accuracy %.4f; fine-tuning encoder and head next",
            extra["frozen_encoder_accuracy"],
        )
        for param in classifier.encoder.parameters():
            param.requires_grad_(True)
        finetune = replace(spec.recipe, epochs=spec.recipe.finetune_epochs, lr=spec.recipe.lr / 3)
        stage2 = stage(classifier, classification(None), finetune, "finetune")
        arch += " (encoder fine-tuned)"
    metrics = finish_classifier(spec, config, data, run_dir, device, classifier, stage2, config.name, arch, extra)
    if not distributed.is_main():
        return {}

    test = data.splits["test"].pixels
    recon = predict(autoencoder, test, spec.input, device)
    mse = float(np.mean((recon - normalize(test, spec.input)) ** 2))
    plot_reconstructions(normalize(test[:16], spec.input), recon[:16], run_dir / "reconstructions.png")
    ae_metrics = {
        "test": {"reconstruction_mse": mse, "n": len(test)},
        "training": {
            "best_epoch": stage1.best_epoch,
            "epochs_run": stage1.epochs_run,
            "best_val_loss": stage1.best_val_loss,
            "seconds": round(stage1.seconds, 1),
        },
    }
    log.info("autoencoder test reconstruction MSE %.5f", mse)
    fields = _card_fields(
        spec,
        config,
        data,
        autoencoder,
        ae_metrics,
        "autoencoder",
        f"{config.name}_autoencoder",
        [],
        None,
        None,
        config.arch,
    )
    (run_dir / "metrics-autoencoder.json").write_text(json.dumps(ae_metrics, indent=2))
    if config.export:
        _export_and_publish(autoencoder, ["reconstruction", "code"], spec, config, data, run_dir, fields)
    return {"classifier": metrics, "autoencoder": ae_metrics}


def _train_accuracy_at(result) -> float | None:
    """Training accuracy logged at the best epoch (with augmentation and dropout on, as Keras reports it)."""
    history = history_file(result.checkpoint)
    if not history.exists():  # an adopted checkpoint that came without its history
        return None
    with open(history) as handle:
        rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) == result.best_epoch]
    return float(rows[0]["train_acc"]) if rows else None


def _write_report(run_dir: Path, fields: dict, metrics: dict) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    test = metrics["test"]
    summary = {
        k: test.get(k)
        for k in (
            "accuracy",
            "balanced_accuracy",
            "precision",
            "recall",
            "specificity",
            "f1",
            "roc_auc",
            "pr_auc",
            "threshold",
        )
    }
    log.info("%s test metrics: %s", fields["name"], json.dumps({k: v for k, v in summary.items() if v is not None}))


def _export_and_publish(
    module, outputs: list[str], spec: TaskSpec, config: RunConfig, data: Dataset, run_dir: Path, fields: dict
) -> None:
    onnx_path = run_dir / f"{fields['name']}.onnx"
    c, h, w = spec.input.channels, spec.input.height, spec.input.width
    export_onnx(module, torch.zeros(2, c, h, w), onnx_path, outputs)
    if config.half_weights:
        store_weights_in_half(onnx_path)
    explained = EXPLANATION_OUTPUT in outputs  # probabilities, then the class activation maps
    diffs = verify_parity(module, onnx_path, data.splits["val"].pixels[:128], spec.input, explanation=explained)
    if explained:
        parity, explanation = diffs[0], explanation_info(module, spec.input, diffs[1])
    else:
        parity, explanation = max(diffs), None
    report = [run_dir / f for f in REPORT_FILES]
    if fields["kind"] == "autoencoder":
        report = [
            run_dir / "metrics-autoencoder.json",
            run_dir / "history-autoencoder.csv",
            run_dir / "curves-autoencoder.png",
            run_dir / "reconstructions.png",
            run_dir / "config.json",
        ]
    target = publish(onnx_path, fields, Path(config.models_dir), report, parity, config.version, explanation)
    log.info("published %s (ONNX parity max |diff| %.1e)", target, parity)


def main(argv: list[str] | None = None) -> int:
    """One training run; under `torchrun --nproc_per_node=N` one of N processes (training.distributed)."""
    level = logging.INFO if distributed.is_main() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for chatty in ("onnxscript", "onnx_ir"):  # the exporter's graph passes log every node they touch at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        spec, config = resolve(args)
        # Denormal floats (tiny activations and gradients, common in MLPs with weight decay) slow CPU math ~10×.
        torch.set_flush_denormal(True)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        if config.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but PyTorch sees no CUDA device")
        if distributed.launched() and config.epochs == 0:
            raise ValueError("--epochs 0 evaluates and exports without training: run it without torchrun")
        device = distributed.setup(config.device)
        with distributed.main_first():  # rank 0 decodes and caches the images, the others read its cache
            data = load_dataset(spec, Path(config.data), config.seed, Path(config.cache_dir))
        if config.resumes and config.data_fingerprint not in ("", data.fingerprint):
            raise DataError(
                f"the images under {config.data} are not those the run started with (their splits' fingerprint was "
                f"{config.data_fingerprint}, is {data.fingerprint}): resuming would train and test on other splits"
            )
        config.data_fingerprint = data.fingerprint
        if config.export:  # said before training, not after it
            _refuse_replacing(spec, config, data)
        # one folder for all ranks, named by rank 0's clock; only rank 0 writes into it (and publishes). Made once the
        # data is known to be usable, so that a refused run leaves no folder behind. A resumed run goes on in its own.
        run_dir = args.resume or Path(config.runs_dir) / config.name / time.strftime("%Y%m%d-%H%M%S")
        run_dir = distributed.broadcast(run_dir)
        with contextlib.ExitStack() as held:
            busy = None
            if distributed.is_main():
                run_dir.mkdir(parents=True, exist_ok=True)
                try:
                    held.enter_context(sole_writer(run_dir))
                except RuntimeError as error:
                    busy = str(error)
            if busy := distributed.broadcast(busy):  # every rank stops, or none
                raise RuntimeError(busy)
            if distributed.is_main():
                (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
                log.info("run folder %s (%d processes)", run_dir, distributed.world_size())
            for note in data.notes:
                log.info("data: %s", note)
            trainer = train_autoencoder if spec.kind == "autoencoder" else train_classifier
            trainer(spec, config, data, run_dir, device)
        log.info("report in %s", run_dir)
        return 0
    except (DataError, ExportError, ValueError, RuntimeError, KeyError) as error:
        log.error("%s", error)
        return 2
    finally:
        torch.set_flush_denormal(False)  # it is process-wide CPU state: do not leak it into a caller (tests, compare)
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
