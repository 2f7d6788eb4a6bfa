"""Tasks are data: each is one declared :class:`TaskSpec`. Adding a task is adding one spec to this file, or
writing it in a task file (training.task_files) to train on your own data without touching the code.

A spec names where the data comes from and how it is laid out, which classes exist (and how folders map onto them),
how an image becomes a tensor (the :class:`~contract.card.InputSpec` that goes into the model card), the default
architecture and the training recipe of the reference report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

from contract.card import MODEL_NAME_PATTERN, InputSpec, ModelCard

IMAGENET_GRAY = dict(channels=1, normalization="mean_std", mean=(0.449,), std=(0.226,))
IMAGENET_RGB = dict(channels=3, normalization="mean_std", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Augment:
    """Random training-time augmentation (torchvision transforms v2), applied to the resized uint8 pixels."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # a misspelt setting in a task file is an error, not a no-op

    rotation: float = 0.0  # degrees, uniform in ±rotation
    shift: float = 0.0  # fraction of width/height
    shear: float = 0.0  # degrees
    zoom: float = 0.0  # scale uniform in [1 - zoom, 1 + zoom]
    crop: float = 0.0  # random-resized crop: a patch of at least this share of the area, aspect 3:4-4:3, resized back
    hflip: bool = False
    vflip: bool = False
    right_angles: bool = False  # rotate by a random multiple of 90 degrees
    brightness: float = 0.0  # factor uniform in [1 - brightness, 1 + brightness]
    contrast: float = 0.0  # likewise
    erasing: float = 0.0  # probability of blanking one random rectangle of 2-33 % of the image (Random Erasing)

    def __post_init__(self) -> None:
        """Refuse an impossible setting when it is given, not when torchvision meets it after the data is decoded."""
        ranges = {"rotation": (0, 180), "shift": (0, 1), "shear": (0, 90), "zoom": (0, 0.99), "crop": (0, 1),
                  "brightness": (0, 1), "contrast": (0, 1), "erasing": (0, 1)}  # fmt: skip
        for name, (low, high) in ranges.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"augmentation {name} must be between {low} and {high}; got {getattr(self, name)}")


@dataclass(frozen=True)
class Recipe:
    __pydantic_config__ = ConfigDict(extra="forbid")

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    class_weights: bool = True  # "balanced" weights n / (k * n_c) in the loss
    label_smoothing: float = 0.0  # classifiers: share of the target spread over all classes
    plateau_factor: float = 0.2
    plateau_patience: int = 10
    plateau_threshold: float = 1e-4  # relative: an epoch improves on the best val loss only below best × (1 - this)
    min_lr: float = 1e-5
    early_stopping_patience: int = 10
    # wall-clock budget per training stage: no epoch is started that would, at the last epoch's pace, end past it
    time_limit_minutes: float = 0.0  # 0: none
    # what checkpoint-best and early stopping watch (the learning-rate plateau always watches val loss);
    # val_acc: classifiers only, for when accuracy is the target and a smoothed loss drifts from it
    monitor: Literal["val_loss", "val_acc"] = "val_loss"
    finetune_epochs: int = 0  # autoencoder tasks: after the frozen-encoder classifier, fine-tune encoder + head
    reconstruction_loss: Literal["mse", "bce"] = "mse"  # autoencoder tasks; the test metric is MSE either way

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be 0 (with --checkpoint: evaluate and export it) or more; got {self.epochs}")
        if self.time_limit_minutes < 0:
            raise ValueError(
                f"the time limit must be 0 (none) or a positive number of minutes; got {self.time_limit_minutes:g}"
            )


@dataclass(frozen=True)
class TaskSpec:
    __pydantic_config__ = ConfigDict(extra="forbid")

    name: str
    description: str
    intended_input: str
    source: Literal["image_folders", "mnist_idx"]
    data_hint: str  # where the public dataset comes from, for --help and errors
    input: InputSpec
    arch: str
    recipe: Recipe
    augment: Augment = Augment()
    arch_options: dict = field(default_factory=dict)
    pretrained: bool = False
    kind: Literal["classifier", "autoencoder"] = "classifier"
    # folder name → class name. Folders not named are left out. None: every folder is its own class.
    class_map: dict[str, str] | None = None
    classes: tuple[str, ...] | None = None  # the order of the output; default: sorted class names
    positive_class: str | None = None  # binary tasks: the class the threshold is about
    # classifiers whose labels survive a left-right flip: evaluate and export the mean of the image's and its mirror
    # image's probabilities (training.mirror), at twice the inference cost
    mirror_average: bool = False
    min_sensitivity: float = 0.95  # binary tasks: threshold = highest one with validation sensitivity ≥ this
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    # a regular expression searched in each image's path under the data folder (e.g. `patient_(\d+)`): images whose
    # matches are equal (the first group's, if it has one) never straddle splits, so that no patient is in two.
    # None: only identical copies of an image are kept together
    group_pattern: str | None = None
    # (k, n): cross-validation's k-th of n folds is the test split, instead of the test split given or carved (the
    # images of every split given are pooled, then cut into n stratified folds, groups whole); val is carved from
    # the rest. training.run --fold k/n, training.compare --folds n
    test_fold: tuple[int, int] | None = None
    limitations: tuple[str, ...] = ()  # known limitations, measured: written into the model card
    reference: str = ""  # what the reference report achieved, for the README's comparison table
    scratch_reference: str = ""  # the same for models trained without pretrained weights, where it differs

    def __post_init__(self) -> None:
        """Refuse a spec whose parts contradict each other when it is declared, not after its data is decoded."""
        if not re.fullmatch(MODEL_NAME_PATTERN, self.name):
            raise ValueError(f"the task name {self.name!r} must be lower-case letters, digits and _ (a model's name)")
        if self.classes and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"the classes {list(self.classes)} name one class twice")
        classes = self.classes or (sorted(set(self.class_map.values())) if self.class_map else None)
        if classes is not None and self.positive_class is not None:
            if self.positive_class not in classes:
                raise ValueError(f"the positive class {self.positive_class!r} is not one of {list(classes)}")
            if len(classes) != 2:
                raise ValueError(f"a positive class (and its threshold) is for two classes, not {len(classes)}")
        if self.classes and self.class_map and not set(self.class_map.values()) <= set(self.classes):
            raise ValueError(f"class_map maps folders onto classes not in {list(self.classes)}")
        if self.group_pattern is not None:
            try:
                groups = re.compile(self.group_pattern).groups
            except re.error as error:
                raise ValueError(f"group_pattern {self.group_pattern!r} is not a regular expression: {error}") from None
            if groups > 1:
                raise ValueError(f"group_pattern {self.group_pattern!r} has {groups} groups; give it one or none")
            if re.fullmatch(self.group_pattern, ""):
                raise ValueError(
                    f"group_pattern {self.group_pattern!r} matches an empty path: it would group every image"
                )
        if self.test_fold is not None:
            k, n = self.test_fold
            if not (n >= 2 and 1 <= k <= n):
                raise ValueError(f"the test fold must be k of n folds, n >= 2 and 1 <= k <= n; got {k} of {n}")

    def with_overrides(self, **changes) -> TaskSpec:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data: what a run records (config.json, the model card) and a task file holds."""
        return _SPEC.dump_python(self, mode="json")

    @staticmethod
    def from_dict(data: dict[str, Any], origin: str = "task spec") -> TaskSpec:
        """The spec `data` declares (as `as_dict` writes it), validated; ValueError naming every bad field."""
        try:
            return _SPEC.validate_python(data)
        except ValidationError as error:
            raise ValueError(f"{origin}: {'; '.join(map(_problem, error.errors()))}") from None


_SPEC = TypeAdapter(TaskSpec)
_TABLES = {(): TaskSpec, ("input",): InputSpec, ("recipe",): Recipe, ("augment",): Augment}


def _problem(error: dict[str, Any]) -> str:
    """One validation error as `where: what`, with the settings allowed where an unknown one was given."""
    where, what = error["loc"], error["msg"].removeprefix("Value error, ")
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden") and where[:-1] in _TABLES:
        table = _TABLES[where[:-1]]
        names = list(InputSpec.model_fields) if table is InputSpec else [f.name for f in fields(table)]
        what += f" (the settings here: {', '.join(names)})"
    return f"{'.'.join(map(str, where)) or 'spec'}: {what}"


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    TASKS[spec.name] = spec
    return spec


def recorded_task(card: ModelCard) -> TaskSpec | None:
    """The task a published model was trained as: the spec its card records (a task file's too), else, for cards
    written before cards recorded it, the registered task of that name (None if there is none)."""
    recorded = card.training.get("task_spec")
    return TaskSpec.from_dict(recorded, f"{card.name}'s card") if recorded else TASKS.get(card.task)


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


register_task(
    TaskSpec(
        name="chest_xray",
        reference="EfficientNet-B2 on a random 60/20/20 re-split: acc 0.89, recall 0.85, ROC-AUC 0.990",
        description="Pneumonia vs normal on pediatric chest X-rays (Kermany et al. 2018).",
        intended_input="frontal (AP/PA) pediatric chest radiographs, grayscale",
        source="image_folders",
        data_hint="Kaggle 'chest-xray-pneumonia' (paultimothymooney): "
        "<root>/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg",
        input=InputSpec(height=128, width=128, **IMAGENET_GRAY),
        arch="efficientnet_lite0",
        pretrained=True,
        # The report's recipe is 30 epochs at 1e-4 with patience 10; on two CPU cores a pretrained Lite0 converges in
        # a dozen epochs at 3e-4, so the plateau and early-stopping patience shrink with it.
        recipe=Recipe(epochs=12, batch_size=64, lr=3e-4, plateau_patience=2, early_stopping_patience=5),
        augment=Augment(rotation=30, shift=0.2, shear=11.5, zoom=0.2, hflip=True),  # shear 0.2 rad
        positive_class="PNEUMONIA",
        # the file names carry the patient (person123_bacteria_4.jpeg, IM-0115-0001.jpeg, NORMAL2-IM-0955-0001.jpeg):
        # one patient's images share a split, else 60 % of a random split's test images have a patient in training
        group_pattern=r"(person\d+|NORMAL2-IM-\d+|IM-\d+)",
    )
)

register_task(
    TaskSpec(
        name="alzheimer",
        reference="CNN on ADNI MCI vs AD: acc ≈ 0.83",
        description="Mild cognitive impairment (MCI, CDR 0.5) vs Alzheimer's disease (AD, CDR >= 1) on axial brain MRI "
        "slices (Kaggle 'Alzheimer's Dataset (4 class of Images)', OASIS-derived).",
        intended_input="axial T1 brain MRI slices, skull included, grayscale",
        source="image_folders",
        data_hint="Kaggle 'alzheimers-dataset-4-class-of-images': "
        "<root>/{train,test}/{NonDemented,VeryMildDemented,MildDemented,ModerateDemented}/*.jpg",
        # The report's CNN (--arch alzheimer_cnn --image-size 64, min-max input) stays near chance on this data after
        # several epochs (train accuracy ≈ 0.63), so the shipped model is the ImageNet-pretrained Lite0 at 112 px.
        input=InputSpec(height=112, width=112, **IMAGENET_GRAY),
        arch="efficientnet_lite0",
        pretrained=True,
        recipe=Recipe(epochs=15, batch_size=32, lr=3e-4, plateau_patience=2, early_stopping_patience=5),
        augment=Augment(rotation=5, shift=0.05, hflip=True),
        # CDR 0.5 is MCI, CDR 1 and 2 are AD; NonDemented is left out. Map NonDemented too for a 3- or 4-class model.
        class_map={"VeryMildDemented": "MCI", "MildDemented": "AD", "ModerateDemented": "AD"},
        classes=("MCI", "AD"),
        positive_class="AD",
        min_sensitivity=0.9,
        limitations=(
            "tested on slices of scans whose other slices it trained on: the dataset's images carry no scan ID and "
            "its slices come 32 to a scan. On scans it never saw (the same recipe split by scan, 5-fold "
            "cross-validation over the 100 scans, examples/tasks/alzheimer_by_scan.toml with --folds 5) ROC-AUC "
            "0.56 +- 0.09 (0.45 to 0.71 by fold) and balanced accuracy 0.52: chance level, not for new patients' "
            "scans",
        ),
    )
)

register_task(
    TaskSpec(
        name="covid",
        reference="5-block CNN on 184 images: acc 0.95 (test of 40)",
        description="COVID-19 vs normal adult chest X-rays (COVID-19 Radiography Database).",
        intended_input="frontal adult chest radiographs, grayscale",
        source="image_folders",
        data_hint="Kaggle 'covid19-radiography-database': <root>/train/{COVID,NORMAL}/*.(png|jpg)",
        # The report's CNN (`--arch covid_cnn --image-size 150 --augment right_angles=true --augment vflip=true`, its
        # 90° rotations and flips) stayed at chance on validation data in our runs (train accuracy 0.80, validation
        # predicting one class), so the shipped model is the ImageNet-pretrained Lite0 used for chest X-rays.
        input=InputSpec(height=128, width=128, **IMAGENET_GRAY),
        arch="efficientnet_lite0",
        pretrained=True,
        recipe=Recipe(epochs=6, batch_size=32, lr=3e-4, plateau_patience=1, early_stopping_patience=3),
        augment=Augment(rotation=10, shift=0.1, zoom=0.1, hflip=True),
        positive_class="COVID",
        limitations=(
            "tells COVID from NORMAL with ROC-AUC 0.82 from a frame of the image's border alone, the central 80 % "
            "blacked out (chest_xray under the same test: 0.56; python -m training.occlusion): it uses cues outside "
            "the lungs, likely those of the different sources its COVID and NORMAL images came from. Check it on "
            "your own site's images before use",
        ),
    )
)

register_task(
    TaskSpec(
        name="emotion",
        reference="AffectNet 8 classes: val acc 0.45 / 0.49 / 0.49 (AlexNet / VGG / MobileNet); FER2013 human ≈ 0.65",
        description="Facial expression, 7 classes (FER2013); an AffectNet folder trains the 8-class model unchanged.",
        intended_input="a tightly cropped, roughly frontal face, grayscale",
        source="image_folders",
        data_hint="Kaggle 'fer2013' (msambare): "
        "<root>/{train,val,test}/{angry,disgust,fear,happy,neutral,sad,surprise}/*",
        # 48-px faces upsampled: ImageNet features need a larger map (64 px: val acc 0.56; 112 px: 0.62)
        input=InputSpec(height=112, width=112, **IMAGENET_GRAY),
        arch="efficientnet_lite0",
        pretrained=True,
        # plain accuracy is the target: no class weights (disgust would weigh 9x), label smoothing for noisy labels
        recipe=Recipe(
            epochs=18,
            batch_size=64,
            lr=1e-3,
            class_weights=False,
            label_smoothing=0.1,
            plateau_patience=1,
            early_stopping_patience=3,
        ),
        augment=Augment(rotation=20, shift=0.1, hflip=True),
        mirror_average=True,  # expressions are left-right symmetric; the flip is already a training augmentation
    )
)

register_task(
    TaskSpec(
        name="cats_dogs",
        reference="frozen ResNet + augmentation: test acc 0.99 (100 images); VGG16 0.90",
        scratch_reference="from scratch with augmentation: ≈ 0.82 (the issue's data note)",
        description="Cat vs dog photos (Kaggle Dogs vs. Cats / Asirra).",
        intended_input="a photo of one cat or one dog, RGB",
        source="image_folders",
        data_hint="Kaggle 'dogs-vs-cats' as <root>/{train,test}/{cats,dogs}/*.jpg",
        input=InputSpec(height=160, width=160, **IMAGENET_RGB),
        arch="efficientnet_lite0",
        pretrained=True,
        recipe=Recipe(epochs=10, batch_size=32, lr=3e-4, plateau_patience=2, early_stopping_patience=4),
        augment=Augment(rotation=10, zoom=0.15, hflip=True),
        class_map={"cats": "cat", "dogs": "dog"},
    )
)

register_task(
    TaskSpec(
        name="mnist",
        reference="classifier on the 30-d code: acc 0.93; autoencoder val MSE ≈ 0.02",
        description="Handwritten digits: a fully connected autoencoder, and a digit classifier on its 30-d code.",
        intended_input="one handwritten digit, light strokes on a dark background (dark-on-light is inverted)",
        source="mnist_idx",
        data_hint="torchvision's MNIST layout: <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
        input=InputSpec(channels=1, height=28, width=28, polarity="dark_background"),
        arch="mlp_autoencoder",
        kind="autoencoder",
        # The report trains with MSE for 10 epochs (test MSE ≈ 0.019 here; 0.0147 after 60). Binary cross-entropy on
        # the same sigmoid outputs gives the saturated pixels a useful gradient and reaches a lower *MSE* (0.0097 after
        # 11 epochs in a side-by-side run): `--reconstruction-loss mse` reproduces the report.
        # Its frozen-encoder classifier reaches 0.95 (the report: 0.93); fine-tuning encoder + head lifts that to 0.985.
        recipe=Recipe(
            epochs=60,
            batch_size=100,
            lr=1e-3,
            weight_decay=1e-5,
            class_weights=False,
            finetune_epochs=20,
            reconstruction_loss="bce",
            plateau_patience=3,
            # the loss keeps creeping down by ~0.3 %/epoch at lr 1e-3 and the plateau rule never fired in 60 epochs
            # (test MSE 0.0104); counting gains under 0.5 % as a plateau decays the rate around epoch 25
            plateau_threshold=0.005,
            early_stopping_patience=6,
        ),
        val_fraction=5000 / 70000,
    )
)
