"""Task files: a task declared in TOML, to train on your own data without editing training/tasks.py.

A task file holds a :class:`~training.tasks.TaskSpec`'s fields (examples/tasks/ has two). With ``base = "<task>"``
it starts from a registered task, and its ``[input]``, ``[recipe]``, ``[augment]`` and ``[arch_options]`` tables
change only the settings they name; without a base it declares at least the input and the architecture. Either way
it says what the model is for (``description``, ``intended_input``): that goes into the model card, which is what
the service's users read. The name defaults to the file's stem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from training import architectures
from training.data import IMAGE_SUFFIXES
from training.tasks import TASKS, TaskSpec, get_task

TASK_FILE_SUFFIX = ".toml"
FOLDER_LAYOUT = (
    f"<root>/{{train,val,test}}/<class>/*.({'|'.join(sorted(s[1:] for s in IMAGE_SUFFIXES))}), the val and test "
    "folders optional (carved from train when missing), or <root>/<class>/*"
)
NESTED = ("input", "recipe", "augment", "arch_options")  # tables merged setting by setting onto the base's
# about the base task's reference report and the base model's measured limitations, not yours
NOT_INHERITED = ("reference", "scratch_reference", "limitations")
# a file that declares a class set (class_map or classes) gets none of these from its base: a new class set has its
# own positive class and sensitivity floor, if any
CLASS_SET = ("class_map", "classes")
CLASS_FIELDS = (*CLASS_SET, "positive_class", "min_sensitivity")
REQUIRED = ("description", "intended_input")


def load_task_file(path: Path) -> TaskSpec:
    """The task `path` declares; ValueError saying what is wrong with it."""
    try:
        declared: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"task file {path}: {error}") from None
    missing = [key for key in REQUIRED if key not in declared]
    if missing:
        raise ValueError(f"task file {path}: declare {' and '.join(missing)}: what the model is for goes into its card")
    declared.setdefault("name", path.stem)
    fields = _inherited(declared.pop("base", None), path)
    if any(key in declared for key in CLASS_SET):
        fields = {key: value for key, value in fields.items() if key not in CLASS_FIELDS}
    for key, value in declared.items():
        fields[key] = fields.get(key, {}) | value if key in NESTED and isinstance(value, dict) else value
    spec = TaskSpec.from_dict(fields, origin=f"task file {path}")
    if spec.arch not in architectures.list_models():
        raise ValueError(f"task file {path}: unknown arch {spec.arch!r}; choose one of {architectures.list_models()}")
    return spec


def _inherited(base: str | None, path: Path) -> dict[str, Any]:
    """The fields a task file starts from: its base task's, or the defaults of a folder-per-class dataset."""
    if base is None:
        return {"source": "image_folders", "data_hint": FOLDER_LAYOUT, "recipe": {}, "augment": {}}
    if base not in TASKS:
        raise ValueError(f"task file {path}: unknown base task {base!r}; choose one of {', '.join(sorted(TASKS))}")
    fields = get_task(base).as_dict()
    for key in NOT_INHERITED:
        del fields[key]
    return fields | {"data_hint": FOLDER_LAYOUT if fields["source"] == "image_folders" else fields["data_hint"]}


def is_task_file(task: str) -> bool:
    return task.endswith(TASK_FILE_SUFFIX)


def resolve_task(task: str) -> TaskSpec:
    """A registered task by name, or the task a .toml file declares."""
    return load_task_file(Path(task)) if is_task_file(task) else get_task(task)


def task_argument(task: str) -> str:
    """argparse type of a task argument: a registered name, or the path of a task file (read later, by
    `resolve_task`, so that its errors are logged like any other)."""
    if task in TASKS or is_task_file(task):
        return task
    raise argparse.ArgumentTypeError(
        f"unknown task {task!r}: choose one of {', '.join(sorted(TASKS))}, or give a task file ({TASK_FILE_SUFFIX})"
    )


TASK_HELP = (
    f"a task ({', '.join(sorted(TASKS))}) or a task file ({TASK_FILE_SUFFIX}) declaring your own: docs/own-data.md"
)
