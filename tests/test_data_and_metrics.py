"""Splitting rules (duplicates never straddle splits, stratification) and the evaluation metrics."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.synthetic import make_image_folder
from training import similar_groups
from training.data import DataError, load_dataset
from training.evaluate import choose_threshold, classification_metrics
from training.tasks import get_task


def test_splits_are_stratified_disjoint_and_cached(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", ["NORMAL", "PNEUMONIA"], per_class=50, size=24)
    spec = get_task("chest_xray").with_overrides(
        input=get_task("chest_xray").input.model_copy(update={"height": 16, "width": 16})
    )
    data = load_dataset(spec, root, seed=0, cache_dir=tmp_path / "cache")
    assert data.sizes() == {"train": 80, "val": 10, "test": 10}
    assert data.class_counts("test") == {"NORMAL": 5, "PNEUMONIA": 5}
    ids = [set(split.ids) for split in data.splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert list(tmp_path.joinpath("cache").glob("*.npy"))
    again = load_dataset(spec, root, seed=0, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.splits["train"].pixels, data.splits["train"].pixels)
    assert again.fingerprint == data.fingerprint


def test_duplicates_never_straddle_splits_and_label_conflicts_are_dropped(tmp_path: Path) -> None:
    root = make_image_folder(
        tmp_path / "data", ["NORMAL", "PNEUMONIA"], per_class=30, size=24, splits=("train", "test")
    )
    leaked = root / "test" / "NORMAL" / "NORMAL_0.png"
    shutil.copy(leaked, root / "train" / "NORMAL" / "copy_of_test.png")
    for i in range(5):  # five copies of one image: they must land in a single split
        shutil.copy(root / "train" / "PNEUMONIA" / "PNEUMONIA_1.png", root / "train" / "PNEUMONIA" / f"dup{i}.png")
    shutil.copy(root / "train" / "NORMAL" / "NORMAL_3.png", root / "train" / "PNEUMONIA" / "conflict.png")
    spec = get_task("chest_xray").with_overrides(
        input=get_task("chest_xray").input.model_copy(update={"height": 16, "width": 16})
    )
    data = load_dataset(spec, root, seed=1, cache_dir=tmp_path / "cache")
    assert "train/NORMAL/copy_of_test.png" not in data.splits["train"].ids
    homes = {
        name
        for name, split in data.splits.items()
        for i in split.ids
        if "dup" in i or i.endswith("_1.png") and "PNEUMONIA" in i and name != "test"
    }
    assert len(homes) == 1
    all_ids = [i for split in data.splits.values() for i in split.ids]
    assert "train/PNEUMONIA/conflict.png" not in all_ids and "train/NORMAL/NORMAL_3.png" not in all_ids
    assert any("different labels" in note for note in data.notes)


def _patients(ids: list[str]) -> set[str]:
    return {re.search(r"patient(\w\d+)_", i).group(1) for i in ids}


def test_a_group_pattern_keeps_each_patients_images_in_one_split(tmp_path: Path) -> None:
    """Four images per patient, the patient in the file name: with the task's group_pattern no patient is in two
    splits (without it, some are), and a given test folder's patients are taken out of training."""
    root = make_image_folder(tmp_path / "data", ["NORMAL", "PNEUMONIA"], per_class=60, size=24)
    for folder in (root / "train" / "NORMAL", root / "train" / "PNEUMONIA"):
        for i, image in enumerate(sorted(folder.iterdir())):
            image.rename(folder / f"patient{folder.name[0]}{i // 4}_view{i % 4}.png")
    chest = get_task("chest_xray")
    spec = chest.with_overrides(
        input=chest.input.model_copy(update={"height": 16, "width": 16}), group_pattern=r"patient(\w\d+)_"
    )
    grouped = load_dataset(spec, root, seed=0, cache_dir=tmp_path / "cache")
    patients = [_patients(split.ids) for split in grouped.splits.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert grouped.sizes() == {"train": 96, "val": 12, "test": 12}  # whole patients: 24, 3 and 3 of 30
    assert any("groups (group_pattern) kept together" in note for note in grouped.notes)
    by_image = load_dataset(spec.with_overrides(group_pattern=None), root, seed=0, cache_dir=tmp_path / "cache")
    assert _patients(by_image.splits["train"].ids) & _patients(by_image.splits["test"].ids)

    (root / "test" / "NORMAL").mkdir(parents=True)  # a test folder of its own, holding one image of patient N0
    Image.fromarray(np.full((24, 24), 200, np.uint8)).save(root / "test" / "NORMAL" / "patientN0_view9.png")
    given = load_dataset(spec, root, seed=0, cache_dir=tmp_path / "cache")
    assert given.splits["test"].ids == ["test/NORMAL/patientN0_view9.png"]
    assert "N0" not in _patients(given.splits["train"].ids) | _patients(given.splits["val"].ids)
    assert any("dropped 4 training images with an identical copy or an image of its group" in n for n in given.notes)


def test_folds_test_every_patient_once(tmp_path: Path) -> None:
    """Cross-validation (test_fold k of n): the n test splits partition all the images, given splits pooled, each
    holding whole patients of both classes; validation comes from the other folds."""
    root = make_image_folder(tmp_path / "data", ["NORMAL", "PNEUMONIA"], per_class=60, size=24, splits=("train", "val"))
    for letter, folder in zip("ABCD", sorted(root.glob("*/*")), strict=True):
        for i, image in enumerate(sorted(folder.iterdir())):
            image.rename(folder / f"patient{letter}{i // 4}_view{i % 4}.png")
    chest = get_task("chest_xray")
    spec = chest.with_overrides(
        input=chest.input.model_copy(update={"height": 16, "width": 16}), group_pattern=r"patient(\w\d+)_"
    )
    tests = []
    for k in (1, 2, 3):
        data = load_dataset(spec.with_overrides(test_fold=(k, 3)), root, seed=0, cache_dir=tmp_path / "cache")
        patients = [_patients(split.ids) for split in data.splits.values()]
        assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
        assert set(data.class_counts("test").values()) == {40} and len(data.splits["val"]) > 0
        assert f"test split: fold {k} of 3" in " ".join(data.notes)
        tests.append(set(data.splits["test"].ids))
    assert not (tests[0] & tests[1] or tests[0] & tests[2] or tests[1] & tests[2])
    assert len(tests[0] | tests[1] | tests[2]) == 240  # every image of train/ and val/ tested once
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # the folds share one cache of decoded images
    with pytest.raises(ValueError, match="k of n folds"):
        spec.with_overrides(test_fold=(4, 3))
    with pytest.raises(DataError, match="into 31 folds that each hold every class"):  # 30 patients per class
        load_dataset(spec.with_overrides(test_fold=(1, 31)), root, seed=0, cache_dir=tmp_path / "cache")


def test_a_file_written_whole_replaces_its_target_only_when_complete(tmp_path: Path) -> None:
    """How checkpoints, the training history and the image cache are written (training.files)."""
    from training.files import written_whole

    target = tmp_path / "cache.npy"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), written_whole(target) as file:
        file.write(b"half")
        raise RuntimeError("killed while writing")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    with written_whole(target, "w", newline="") as file:
        file.write("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_images_in_a_folder_per_patient_are_read_and_grouped_by_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`<class>/<patient>/<image>` as hospital exports come: every image read, hidden files and folders not, the
    subfolders named in the log, and the split by patient."""
    root = make_image_folder(tmp_path / "data", ["NORMAL", "PNEUMONIA"], per_class=40, size=24)
    for folder in (root / "train" / "NORMAL", root / "train" / "PNEUMONIA"):
        for i, image in enumerate(sorted(folder.iterdir())):
            (folder / f"p{folder.name[0]}{i // 4}").mkdir(exist_ok=True)
            image.rename(folder / f"p{folder.name[0]}{i // 4}" / f"view{i % 4}.png")
        (folder / "._view0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # not an image: must be skipped
        (folder / ".ipynb_checkpoints").mkdir()  # nor a hidden folder's copies
        shutil.copy(folder / f"p{folder.name[0]}0" / "view0.png", folder / ".ipynb_checkpoints" / "view0.png")
    (root / "train" / ".thumbs").mkdir()  # a hidden folder beside the class folders is not a class
    shutil.copy(root / "train" / "NORMAL" / "pN0" / "view1.png", root / "train" / ".thumbs" / "t.png")
    chest = get_task("chest_xray")
    spec = chest.with_overrides(
        input=chest.input.model_copy(update={"height": 16, "width": 16}), group_pattern="/(p\\w\\d+)/"
    )
    with caplog.at_level("INFO", logger="training.data"):
        data = load_dataset(spec, root, seed=0, cache_dir=tmp_path / "cache")
    assert sum(data.sizes().values()) == 80 and data.classes == ["NORMAL", "PNEUMONIA"]
    assert "group_pattern matched 80 of 80 images" in data.notes
    assert "80 images read from 20 subfolders of the class folders" in caplog.text
    patients = [{i.split("/")[2] for i in split.ids} for split in data.splits.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])


def test_a_link_to_a_file_that_is_gone_is_a_data_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", ["NORMAL", "PNEUMONIA"], per_class=10, size=24)
    (root / "train" / "NORMAL" / "moved.png").symlink_to(tmp_path / "elsewhere" / "moved.png")
    with pytest.raises(DataError, match="1 links in .*NORMAL point to no file: .*moved.png"):
        load_dataset(get_task("chest_xray"), root, seed=0, cache_dir=tmp_path / "cache")


def test_a_group_pattern_that_leaves_too_few_groups_is_a_data_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", ["NORMAL", "PNEUMONIA"], per_class=10, size=24)
    chest = get_task("chest_xray")
    spec = chest.with_overrides(  # the class folder's name: two groups, for three splits
        input=chest.input.model_copy(update={"height": 16, "width": 16}), group_pattern="/(NORMAL|PNEUMONIA)/"
    )
    with pytest.raises(DataError, match=r"cannot carve a held-out split out of 1 groups \(group_pattern\)"):
        load_dataset(spec, root, seed=0, cache_dir=tmp_path / "cache")


def test_similar_groups_links_near_copies_under_one_group_name(tmp_path: Path) -> None:
    """`training.similar_groups`: three distinct images per class, each in four noisy copies (as neighbouring slices
    of a scan are), one copy of each in a given test folder: three groups per class across both folders, and a
    group_pattern over the links keeps every group out of training that the test folder holds."""
    rng = np.random.default_rng(0)
    for name in ("Very-Mild", "Mild"):  # "Mild" ends "Very-Mild": the group key must hold the whole class name
        for scan in range(3):
            base = rng.uniform(0, 255, (32, 32))
            for copy in range(4):
                folder = tmp_path / "data" / ("test" if copy == 3 and scan == 0 else "train") / name
                folder.mkdir(parents=True, exist_ok=True)
                noisy = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(noisy).save(folder / f"s{scan}c{copy}.png")
    assert similar_groups.main([str(tmp_path / "data"), str(tmp_path / "links")]) == 0
    links = [p.name for p in (tmp_path / "links").rglob("*.png")]
    assert len(links) == 24 and {link.split("_")[0] for link in links} == {"g0000", "g0001", "g0002"}
    group_of = {p.name.split("_", 1)[1]: p.name.split("_")[0] for p in (tmp_path / "links").rglob("Mild/*.png")}
    assert group_of["s0c3.png"] == group_of["s0c0.png"], "a scan's copy in the test folder joins its group"
    chest = get_task("chest_xray")
    spec = chest.with_overrides(
        input=chest.input.model_copy(update={"height": 16, "width": 16}),
        class_map={"Very-Mild": "NORMAL", "Mild": "PNEUMONIA"},
        classes=("NORMAL", "PNEUMONIA"),
        group_pattern=r"([^/]+/g\d+)_",
    )
    data = load_dataset(spec, tmp_path / "links", seed=0, cache_dir=tmp_path / "cache")
    assert sorted(data.splits["test"].ids) == [
        f"test/{name}/{group_of['s0c3.png']}_s0c3.png" for name in ("Mild", "Very-Mild")
    ]
    held_out = {i.split("/", 1)[1].split("_")[0] for i in data.splits["test"].ids}
    assert not held_out & {i.split("/", 1)[1].split("_")[0] for i in data.splits["train"].ids + data.splits["val"].ids}
    assert any("dropped 6 training images" in note for note in data.notes)
    assert similar_groups.main([str(tmp_path / "data"), str(tmp_path / "links")]) == 2  # never over earlier links
    assert similar_groups.main([str(tmp_path / "data"), str(tmp_path / "data" / "links")]) == 2  # nor inside


def test_threshold_reaches_the_sensitivity_floor() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 500).astype(bool)
    scores = np.clip(truth * 0.3 + rng.normal(0.4, 0.2, 500), 0, 1)
    threshold, rule = choose_threshold(truth, scores, 0.95)
    assert (scores[truth] >= threshold).mean() >= 0.95
    assert "0.95" in rule
    higher = np.sort(scores)[np.searchsorted(np.sort(scores), threshold) + 1]
    assert (scores[truth] >= higher).mean() < 0.95, "the chosen threshold should be the highest that reaches 0.95"


def test_binary_metrics_match_hand_counts() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    p_pos = np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7])
    probs = np.stack([1 - p_pos, p_pos], axis=1)
    m = classification_metrics(labels, probs, ["NORMAL", "PNEUMONIA"], positive=1, threshold=0.5)
    # predictions: 0 1 0 | 1 1 0 1 → TP 3, FN 1, TN 2, FP 1
    assert m["confusion_matrix"] == [[2, 1], [1, 3]]
    assert m["sensitivity"] == pytest.approx(0.75) and m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(0.75) and m["accuracy"] == pytest.approx(5 / 7)
    assert m["roc_auc"] == pytest.approx(11 / 12)


def test_multiclass_metrics_are_macro_averaged_with_per_class_detail() -> None:
    labels = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.2 / 3
    m = classification_metrics(labels, probs, ["a", "b", "c"])
    assert m["accuracy"] == 0.75 and set(m["per_class"]) == {"a", "b", "c"}
    assert m["per_class"]["c"]["recall"] == 0.5 and m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
