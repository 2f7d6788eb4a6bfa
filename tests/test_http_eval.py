"""tools/http_eval.py scores a running service on a labelled folder, as an independent evaluator would."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, Server
from PIL import Image

sys.path.insert(0, str(REPO_ROOT / "tools"))
import http_eval  # noqa: E402


def _folder(root: Path, name: str, colors: list[tuple[int, int, int]]) -> None:
    (root / name).mkdir(parents=True)
    for i, color in enumerate(colors):
        Image.new("RGB", (12, 12), color).save(root / name / f"{i}.png")


def test_scores_the_served_labels_against_the_folders(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    _folder(data, "red", [(200, 10, 10)] * 3)
    _folder(data, "green", [(10, 200, 10), (10, 200, 10), (200, 10, 10)])  # the third one is red: one error
    _folder(data, "crimson", [(180, 0, 20)] * 2)  # mapped to red
    _folder(data, "purple", [(120, 0, 120)])  # not a class of the model: skipped
    out = tmp_path / "result.json"
    assert http_eval.main(["rgb", str(data), "--url", server.url, "--map", "crimson=red", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 8 and result["accuracy"] == pytest.approx(7 / 8)
    assert result["recall"] == {"red": 1.0, "green": pytest.approx(2 / 3)}
    assert result["confusion_matrix"] == [[5, 0, 0], [1, 2, 0], [0, 0, 0]]
    assert "skipped folders" in capsys.readouterr().err


def test_an_unknown_model_is_a_clear_error(server: Server, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        http_eval.main(["nope", str(tmp_path), "--url", server.url])
    assert exit_info.value.code == 2
