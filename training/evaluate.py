"""Held-out evaluation: threshold choice on validation data, metrics on test data, and the plots of a run report."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from contract.decision import predicted_classes  # noqa: E402


def choose_threshold(y_true: np.ndarray, scores: np.ndarray, min_sensitivity: float) -> tuple[float, str]:
    """The highest threshold whose validation sensitivity (recall of the positive class) reaches ``min_sensitivity``.

    The highest such threshold keeps specificity as high as the sensitivity floor allows.
    """
    fpr, tpr, thresholds = skm.roc_curve(y_true, scores)
    reaching = np.flatnonzero(tpr >= min_sensitivity)
    threshold = float(np.clip(thresholds[reaching[0]], 0.0, 1.0)) if len(reaching) else 0.5
    rule = f"highest threshold with validation sensitivity >= {min_sensitivity:g}"
    return threshold, rule


def _specificity(cm: np.ndarray) -> np.ndarray:
    """Per-class specificity TN / (TN + FP) from a confusion matrix (rows true, columns predicted)."""
    total = cm.sum()
    fp = cm.sum(axis=0) - np.diag(cm)
    tn = total - cm.sum(axis=1) - fp
    return tn / np.maximum(tn + fp, 1)


def classification_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    positive: int | None = None,
    threshold: float | None = None,
) -> dict:
    """All reported metrics. Binary tasks are scored for the positive class at the stored threshold."""
    k = len(classes)
    preds = predicted_classes(probs, positive, threshold)
    cm = skm.confusion_matrix(labels, preds, labels=list(range(k)))
    present = np.unique(labels)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, preds, labels=list(range(k)), zero_division=0
    )
    specificity = _specificity(cm)
    one_hot = np.eye(k)[labels]
    per_class = {}
    for c, name in enumerate(classes):
        has_both = 0 < one_hot[:, c].sum() < len(labels)
        per_class[name] = {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "specificity": float(specificity[c]),
            "roc_auc": float(skm.roc_auc_score(one_hot[:, c], probs[:, c])) if has_both else None,
            "pr_auc": float(skm.average_precision_score(one_hot[:, c], probs[:, c])) if has_both else None,
            "support": int(support[c]),
        }
    result = {
        "n": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, preds)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, preds)),
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
    }
    if positive is not None:
        pos = per_class[classes[positive]]
        result.update(
            precision=pos["precision"],
            recall=pos["recall"],
            sensitivity=pos["recall"],
            specificity=pos["specificity"],
            f1=pos["f1"],
            roc_auc=pos["roc_auc"],
            pr_auc=pos["pr_auc"],
            threshold=threshold,
        )
    else:
        aucs = [per_class[classes[c]]["roc_auc"] for c in present if per_class[classes[c]]["roc_auc"] is not None]
        prs = [per_class[classes[c]]["pr_auc"] for c in present if per_class[classes[c]]["pr_auc"] is not None]
        result.update(
            precision=float(np.mean(precision[present])),
            recall=float(np.mean(recall[present])),
            f1=float(np.mean(f1[present])),
            specificity=float(np.mean(specificity[present])),
            roc_auc=float(np.mean(aucs)) if aucs else None,
            pr_auc=float(np.mean(prs)) if prs else None,
            averaging="macro over classes present in the split",
        )
    return result


def held_out_metrics(
    val_labels: np.ndarray,
    val_probs: np.ndarray,
    test_labels: np.ndarray,
    test_probs: np.ndarray,
    classes: list[str],
    positive: int | None,
    threshold: float | None,
) -> dict:
    """The card's `test` and `val` metrics; binary models also report the argmax accuracy beside the threshold's."""
    metrics = {
        "test": classification_metrics(test_labels, test_probs, classes, positive, threshold),
        "val": classification_metrics(val_labels, val_probs, classes, positive, threshold),
    }
    if positive is not None:
        metrics["test"]["argmax_accuracy"] = float((test_probs.argmax(1) == test_labels).mean())
    return metrics


# --- plots -----------------------------------------------------------------------------------------------------------


def plot_history(history_csv: Path, out: Path, title: str) -> None:
    """Loss and accuracy curves by epoch; none for a checkpoint adopted without its history."""
    if not history_csv.exists():
        return
    with open(history_csv) as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (("loss", axes[0], "loss"), ("acc", axes[1], "accuracy")):
        for split in ("train", "val"):
            values = [float(r[f"{split}_{key}"]) for r in rows]
            if not np.all(np.isnan(values)):
                ax.plot(epochs, values, marker="o", ms=3, label=split)
        ax.set(xlabel="epoch", ylabel=label, title=f"{title}: {label}")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_curves(
    labels: np.ndarray, probs: np.ndarray, classes: list[str], positive: int | None, out_dir: Path, title: str
) -> None:
    """ROC and precision-recall curves: the positive class for binary tasks, one curve per class otherwise."""
    curve_classes = [positive] if positive is not None else list(range(len(classes)))
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for c in curve_classes:
            truth = (labels == c).astype(int)
            if truth.min() == truth.max():
                continue
            if kind == "roc":
                x, y, _ = skm.roc_curve(truth, probs[:, c])
                score = skm.roc_auc_score(truth, probs[:, c])
            else:
                y, x, _ = skm.precision_recall_curve(truth, probs[:, c])
                score = skm.average_precision_score(truth, probs[:, c])
            ax.plot(x, y, label=f"{classes[c]} (AUC {score:.3f})")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)")
        else:
            ax.set(xlabel="recall", ylabel="precision")
        ax.set(title=f"{title}: {'ROC' if kind == 'roc' else 'precision-recall'} (test)", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{kind}.png", dpi=110)
        plt.close(fig)


def plot_test_results(
    labels: np.ndarray, probs: np.ndarray, classes: list[str], positive: int | None, metrics: dict, out_dir: Path,
    title: str,
) -> None:  # fmt: skip
    """The report's test-split plots: roc.png, pr.png and confusion.png in `out_dir`."""
    plot_curves(labels, probs, classes, positive, out_dir, title)
    plot_confusion(metrics["test"]["confusion_matrix"], classes, out_dir / "confusion.png", title)


def plot_confusion(cm: list[list[int]], classes: list[str], out: Path, title: str) -> None:
    matrix = np.asarray(cm)
    size = max(4.5, 0.8 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                color="white" if matrix[i, j] > matrix.max() / 2 else "black",
            )
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}: confusion matrix (test)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_reconstructions(inputs: np.ndarray, outputs: np.ndarray, out: Path, count: int = 16) -> None:
    """A grid: inputs on the top row, reconstructions below."""
    count = min(count, len(inputs))
    fig, axes = plt.subplots(2, count, figsize=(count * 0.9, 2.2))
    for i in range(count):
        for row, images in enumerate((inputs, outputs)):
            axes[row, i].imshow(images[i].squeeze(), cmap="gray", vmin=0, vmax=1)
            axes[row, i].axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
