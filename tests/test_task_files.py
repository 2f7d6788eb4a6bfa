"""Task files: a task declared in TOML trains, publishes and is rebuilt from its card like a registered one; a wrong
file is refused before any data is read, saying what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.card import ModelCard
from serving.config import Settings
from serving.repository import ModelRepository
from tests.synthetic import make_image_folder
from tests.tiny_tasks import train
from training import run
from training.export import replacement_problem
from training.published import card_dataset
from training.task_files import load_task_file
from training.tasks import TaskSpec, get_task

EXAMPLES = Path(__file__).parents[1] / "examples" / "tasks"

SHAPES = """
description = "Three kinds of generated pattern"
intended_input = "a generated 40-px grayscale pattern"
arch = "compact_cnn"
arch_options = { width = 8 }
classes = ["a", "b", "c"]

[input]
channels = 1
height = 32
width = 32

[recipe]
batch_size = 16
"""


def write(folder: Path, text: str, name: str = "shapes.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_every_registered_task_round_trips_through_its_dict() -> None:
    for name in ("alzheimer", "cats_dogs", "chest_xray", "covid", "emotion", "mnist"):
        spec = get_task(name)
        assert TaskSpec.from_dict(spec.as_dict()) == spec


def test_the_example_task_files_declare_what_they_say() -> None:
    stages = load_task_file(EXAMPLES / "alzheimer_stages.toml")
    alzheimer = get_task("alzheimer")
    assert stages.name == "alzheimer_stages" and stages.classes == ("CN", "MCI", "AD")
    assert stages.class_map["NonDemented"] == "CN"
    assert stages.positive_class is None and stages.min_sensitivity == 0.95, "a new class set: none of the base's"
    assert stages.input == alzheimer.input and stages.arch == alzheimer.arch and stages.augment == alzheimer.augment
    assert stages.recipe.epochs == 12 and stages.recipe.lr == alzheimer.recipe.lr, "[recipe] changes what it names"
    assert stages.reference == "" and "AD" in stages.description

    lesions = load_task_file(EXAMPLES / "skin_lesions.toml")
    assert lesions.name == "skin_lesions" and lesions.positive_class == "malignant" and lesions.classes is None
    assert (lesions.input.channels, lesions.input.height) == (3, 192) and lesions.input.normalization == "mean_std"
    assert lesions.augment.vflip and lesions.augment.rotation == 180 and lesions.recipe.batch_size == 32
    assert lesions.source == "image_folders" and "<class>" in lesions.data_hint

    by_scan = load_task_file(EXAMPLES / "alzheimer_by_scan.toml")
    assert by_scan.class_map == alzheimer.class_map and by_scan.group_pattern == r"([^/]+/g\d+)_"
    assert alzheimer.limitations and by_scan.limitations == (), "the base model's measured limitation is not yours"


def test_a_base_keeps_its_class_set_unless_the_file_declares_one(tmp_path: Path) -> None:
    head = 'base = "alzheimer"\ndescription = "d"\nintended_input = "i"\n'
    stricter = load_task_file(write(tmp_path, head + "min_sensitivity = 0.8\n", "stricter.toml"))
    alzheimer = get_task("alzheimer")
    assert (stricter.class_map, stricter.classes, stricter.positive_class) == (
        alzheimer.class_map,
        alzheimer.classes,
        alzheimer.positive_class,
    ) and stricter.min_sensitivity == 0.8
    mci = load_task_file(write(tmp_path, head + 'positive_class = "MCI"\n', "mci.toml"))
    assert mci.positive_class == "MCI" and mci.class_map == alzheimer.class_map
    two = 'class_map = { NonDemented = "CN", MildDemented = "AD" }\n'
    own = load_task_file(write(tmp_path, head + two, "own.toml"))
    assert own.classes is None and own.positive_class is None and own.min_sensitivity == 0.95


def test_a_task_file_trains_publishes_and_rebuilds_its_splits_from_the_card(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], per_class=16, size=40)
    task_file = write(tmp_path, 'limitations = ["generated patterns only"]\n' + SHAPES)
    assert train(str(task_file), data, tmp_path) == 0

    folder = tmp_path / "models" / "shapes" / "1"
    card = ModelCard.load(folder)
    assert card.task == "shapes" and card.classes == ["a", "b", "c"] and card.positive_class is None
    assert card.description == "Three kinds of generated pattern" and card.input.height == 32
    assert card.limitations == ["generated patterns only"]
    assert card.architecture.startswith("compact_cnn") and card.training["task_spec"]["arch_options"] == {"width": 8}
    # training.quantize and training.halve rebuild the splits from the card alone: "shapes" is registered nowhere
    task_file.unlink()
    assert card_dataset(card, data, tmp_path / "cache").fingerprint == card.dataset["fingerprint"]
    entry = ModelRepository.load(Settings(models_dir=tmp_path / "models")).get("shapes")
    assert entry is not None and entry.ready
    assert entry.describe()["card"]["limitations"] == ["generated patterns only"]  # GET /models and the page


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SHAPES.replace('description = "Three kinds of generated pattern"', ""), "declare description"),
        ('base = "xray"\ndescription = "d"\nintended_input = "i"', "unknown base task 'xray'"),
        (SHAPES.replace("batch_size = 16", "batch_sise = 16"), "recipe.batch_sise: Unexpected keyword argument"),
        (SHAPES.replace("batch_size = 16", 'batch_size = "many"'), "recipe.batch_size: Input should be a valid int"),
        (SHAPES.replace("channels = 1", "channels = 2"), "input.channels"),
        ('name = "My Shapes"\n' + SHAPES, "the task name 'My Shapes' must be lower-case"),
        (SHAPES.replace('classes = ["a", "b", "c"]', 'classes = ["a", "b"]\npositive_class = "c"'), "positive class"),
        (SHAPES.replace("classes = ", 'positive_class = "a"\nclasses = '), "for two classes, not 3"),
        (SHAPES.replace('arch = "compact_cnn"', 'arch = "resnet1000"'), "unknown arch 'resnet1000'"),
        (SHAPES.replace("[recipe]", "[recipe"), "Expected ']' at the end of a table declaration"),
        (SHAPES.replace('classes = ["a", "b", "c"]', 'classes = ["a", "b", "a"]'), "name one class twice"),
        ('name = "shapes\\n"\n' + SHAPES, "must be lower-case"),
        ('description = "d"\nintended_input = "i"', "input: Field required"),
        ("group_pattern = 'patient(_(\\d+)'\n" + SHAPES, "is not a regular expression"),
        ("group_pattern = '(ward\\d+)_(bed\\d+)'\n" + SHAPES, "has 2 groups; give it one or none"),
        ("group_pattern = '(P\\d+)?'\n" + SHAPES, "matches an empty path: it would group every image"),
    ],
)
def test_a_wrong_task_file_is_refused_saying_what_is_wrong(
    text: str, message: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    task_file = write(tmp_path, text)
    with pytest.raises(ValueError, match="task file") as refused:
        load_task_file(task_file)
    assert message in str(refused.value)
    assert run.main([str(task_file), "--data", str(tmp_path / "nowhere")]) == 2  # before any data is read
    assert message in caplog.text and "does not exist" not in caplog.text


def test_a_positive_class_the_folders_lack_is_a_data_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", ["benign", "other"], per_class=6, size=32)
    task_file = write(tmp_path, SHAPES.replace('classes = ["a", "b", "c"]', 'positive_class = "malignant"'))
    assert train(str(task_file), data, tmp_path, "--no-export") == 2
    assert "the positive class 'malignant' is not one of the classes ['benign', 'other']: rename it" in caplog.text


def test_an_unknown_task_or_model_name_is_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        run.parse_args(["chest-xray", "--data", "x"])
    error = capsys.readouterr().err
    assert "unknown task 'chest-xray'" in error and "task file (.toml)" in error
    assert run.main(["chest_xray", "--data", str(tmp_path), "--name", "Chest-v2"]) == 2
    assert "--name 'Chest-v2'" in caplog.text


def test_a_new_class_set_is_not_published_over_a_name_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The service answers with a name's newest version: a version predicting other classes needs --version."""
    first = make_image_folder(tmp_path / "first", ["a", "b", "c"], per_class=8, size=40)
    assert train(str(write(tmp_path, SHAPES)), first, tmp_path) == 0
    other = make_image_folder(tmp_path / "other", ["x", "y"], per_class=8, size=40)
    two = write(tmp_path, SHAPES.replace('classes = ["a", "b", "c"]', ""), name="two.toml")
    assert train(str(two), other, tmp_path, "--name", "shapes") == 2
    assert "v1: classifier, classes ['a', 'b', 'c']; this run's model: classifier, classes ['x', 'y']" in caplog.text
    assert len(list((tmp_path / "runs" / "shapes").iterdir())) == 1, "refused before training: no run folder"
    assert train(str(two), other, tmp_path, "--name", "shapes", "--version", "2") == 0
    assert ModelCard.load(tmp_path / "models" / "shapes" / "2").classes == ["x", "y"]
    problem = replacement_problem(tmp_path / "models", "shapes", "autoencoder", [])
    assert problem is not None and "v2: classifier, classes ['x', 'y']; this run's model: autoencoder" in problem


def test_folder_mistakes_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", ["covid", "healthy"], per_class=6, size=32)
    typo = SHAPES.replace('classes = ["a", "b", "c"]', 'class_map = { covid = "covid", helthy = "healthy" }')
    assert train(str(write(tmp_path, typo)), data, tmp_path, "--no-export") == 2
    assert "class_map names folders that are not in" in caplog.text and "['helthy']" in caplog.text
    empty = SHAPES.replace('classes = ["a", "b", "c"]', 'classes = ["covid", "healthy", "other"]')
    assert train(str(write(tmp_path, empty)), data, tmp_path, "--no-export") == 2
    assert "no training images of ['other']" in caplog.text
    three = make_image_folder(tmp_path / "three", ["a", "b", "c"], per_class=6, size=32)
    positive = SHAPES.replace('classes = ["a", "b", "c"]', 'positive_class = "a"')
    assert train(str(write(tmp_path, positive)), three, tmp_path, "--no-export") == 2
    assert "there are 3, ['a', 'b', 'c']: leave positive_class out" in caplog.text


def test_compare_takes_a_task_file(tmp_path: Path) -> None:
    """`training.compare my_task.toml --vary ...`: one table under the task's name, one row per value."""
    from training import compare

    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], per_class=8, size=40)
    task_file = write(tmp_path, SHAPES)
    command = [str(task_file), "--data", str(data), "--vary", "lr", "1e-3", "1e-2", "--out", str(tmp_path / "cmp")]
    assert compare.main([*command, "--", "--epochs", "1", "--workers", "0"]) == 0
    table = (tmp_path / "cmp" / "shapes" / "lr.md").read_text()
    assert table.startswith("# shapes: varying lr") and "lr=1e-3" in table and "lr=1e-2" in table
