"""A published model on the command line: the arguments naming it, the folder they point to, and the dataset splits
its card was measured on, and its ONNX file run as serving runs it (training.quantize, training.halve,
training.split_folder, training.occlusion)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.card import CARD_FILE, ModelCard, version_folders
from contract.preprocessing import normalize
from training.data import DataError, Dataset, load_dataset
from training.tasks import recorded_task


def add_published_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a command that works on a published model and the dataset it was trained on."""
    parser.add_argument("model", help="model name in the repository")
    parser.add_argument("--data", required=True, type=Path, help="the dataset root the model was trained on")
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="model repository")
    parser.add_argument("--version", help="model version (default: the highest)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="decoded-image cache")


def published_model_folder(args: argparse.Namespace) -> Path:
    """models/<model>/<version>/ named by those arguments; FileNotFoundError when it has no model card."""
    found = version_folders(args.models_dir / args.model)
    version = args.version or (found[-1] if found else None)
    folder = args.models_dir / args.model / (version or "")
    if version is None or not (folder / CARD_FILE).exists():
        wanted = f"version {args.version}" if args.version else "any version"
        raise FileNotFoundError(f"no published model {args.model}, {wanted}, in {args.models_dir}")
    return folder


def card_dataset(card: ModelCard, data_root: Path, cache_dir: Path, seed: int | None = None) -> Dataset:
    """The splits the card's model was trained and tested on, rebuilt from `data_root` (the fingerprint must match):
    by the task the card records (training.tasks.recorded_task)."""
    spec = recorded_task(card)
    if spec is None:
        raise DataError(f"{card.name}'s card records no task spec and {card.task!r} is not a registered task")
    spec = spec.with_overrides(input=card.input)
    seed = int(card.training.get("seed", 0)) if seed is None else seed
    data = load_dataset(spec, data_root, seed=seed, cache_dir=cache_dir)
    expected = card.dataset.get("fingerprint")
    if expected and data.fingerprint != expected:
        raise DataError(
            "the dataset differs from the one this model was trained and tested on (fingerprint mismatch): "
            "pass the same --data (and the --seed of training)"
        )
    return data


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session with the serving settings: no spinning, full graph optimisation."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def probabilities(sess: ort.InferenceSession, pixels: np.ndarray, spec, batch_size: int = 64) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate(
        [
            sess.run(["probabilities"], {name: normalize(pixels[start : start + batch_size], spec)})[0]
            for start in range(0, len(pixels), batch_size)
        ]
    )
