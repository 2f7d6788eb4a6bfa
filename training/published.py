"""Naming a published model on the command line: the arguments and the folder they point to (training.quantize,
training.halve)."""

from __future__ import annotations

import argparse
from pathlib import Path

from contract.card import CARD_FILE, version_folders


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
