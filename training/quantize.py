"""Static int8 quantization of a published classifier, judged on its own held-out test split.

    python -m training.quantize chest_xray --data ../shared/datasets/chest_xray

Loads models/<name>/<version>/ (the highest version unless --version), rebuilds the card's dataset splits (the
dataset fingerprint must match the card's, so that the test images are the very ones the model was tested on),
calibrates activation ranges on real validation images (the one preprocessing, ``contract.preprocessing``), writes
``model.int8.onnx`` (onnxruntime ``quantize_static``: QDQ, uint8 activations, int8 per-channel weights, Softmax
left in float) beside ``model.onnx``, and records in the card its test accuracy next to the fp32 model's (same
images, same decision rule as serving), its sha256 and its measured speed-up on this CPU. ``served`` is true only
when it is within 1 accuracy point of fp32 and at least ``--min-speedup`` times faster; serving uses the file only
then (and never with IMAGEAI_INT8=off). EfficientNet-style networks often gain nothing on CPU: this measures.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from contract.card import INT8_FILE, INT8_MAX_ACCURACY_DROP, ModelCard, QuantizedInfo, sha256_file
from contract.cli import HelpFormatter
from contract.decision import predicted_classes
from contract.preprocessing import normalize
from training.data import DataError
from training.published import (
    add_published_model_arguments,
    card_dataset,
    probabilities,
    published_model_folder,
    session,
)

log = logging.getLogger("training.quantize")
METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


class QuantizeError(RuntimeError):
    pass


class _Calibration(CalibrationDataReader):
    """Normalised uint8 pixels, in batches, as the graph's input."""

    def __init__(self, input_name: str, pixels: np.ndarray, spec, batch_size: int = 16) -> None:
        self.batches = (
            {input_name: normalize(pixels[start : start + batch_size], spec)}
            for start in range(0, len(pixels), batch_size)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _explanation_only_nodes(graph: onnx.GraphProto, output: str) -> list[str]:
    """Nodes that only compute the explanation output: left in float. They reuse the classifier's weights in
    transposed products, which onnxruntime's per-channel weight quantization cannot pair with the biases."""
    producers = {out: node for node in graph.node for out in node.output}

    def ancestors(tensor: str) -> set[str]:
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            node = producers.get(stack.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                stack.extend(node.input)
        return seen

    others = set().union(*(ancestors(o.name) for o in graph.output if o.name != output))
    return sorted(ancestors(output) - others)


def seconds_per_image(sess: ort.InferenceSession, pixels: np.ndarray, spec, batch_size: int, budget: float) -> float:
    """Best of a few timed passes over the same batches (after one untimed pass)."""
    name = sess.get_inputs()[0].name
    count = max(batch_size, min(len(pixels), 256) // batch_size * batch_size)
    batches = [
        normalize(pixels[np.arange(start, start + batch_size) % len(pixels)], spec)
        for start in range(0, count, batch_size)
    ]
    sess.run(None, {name: batches[0]})
    best, started = float("inf"), time.perf_counter()
    while True:
        t0 = time.perf_counter()
        for batch in batches:
            sess.run(None, {name: batch})
        best = min(best, (time.perf_counter() - t0) / (len(batches) * batch_size))
        if time.perf_counter() - started > budget:
            return best


def quantize(
    folder: Path,
    data_root: Path,
    *,
    calibration_images: int = 256,
    method: str = "minmax",
    per_channel: bool = True,
    min_speedup: float = 1.1,
    seed: int | None = None,
    cache_dir: Path = Path(".cache"),
    timing_seconds: float = 3.0,
) -> QuantizedInfo:
    """Quantize the model in `folder`, evaluate it, write the int8 file and record it in the card."""
    card = ModelCard.load(folder)
    if card.kind != "classifier":
        raise QuantizeError(f"{card.name} is an {card.kind}; int8 quantization is judged by accuracy: classifiers only")
    seed = int(card.training.get("seed", 0)) if seed is None else seed
    data = card_dataset(card, data_root, cache_dir, seed)
    val, test = data.splits["val"], data.splits["test"]
    rng = np.random.default_rng(seed)
    calibration = val.pixels[np.sort(rng.permutation(len(val))[:calibration_images])]
    fp32_path = folder / card.onnx.file
    int8_path = folder / INT8_FILE

    graph = onnx.load(str(fp32_path))
    softmax = [node.name for node in graph.graph.node if node.op_type == "Softmax"]
    explanation = _explanation_only_nodes(graph.graph, card.explanation.output) if card.explanation else []
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        staged = Path(tmp) / INT8_FILE
        quantize_static(
            str(prepared),
            str(staged),
            _Calibration(graph.graph.input[0].name, calibration, card.input),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            calibrate_method=METHODS[method],
            nodes_to_exclude=softmax + explanation,
        )
        onnx.checker.check_model(str(staged))
        staged.replace(int8_path)

    fp32, int8 = session(fp32_path), session(int8_path)

    def accuracy(sess: ort.InferenceSession) -> float:  # as served: the card's decision rule
        probs = probabilities(sess, test.pixels, card.input)
        return float((predicted_classes(probs, card.positive_index, card.threshold) == test.labels).mean())

    fp32_accuracy, int8_accuracy = accuracy(fp32), accuracy(int8)
    speedup = seconds_per_image(fp32, test.pixels, card.input, 32, timing_seconds) / seconds_per_image(
        int8, test.pixels, card.input, 32, timing_seconds
    )
    speedup_single = seconds_per_image(fp32, test.pixels, card.input, 1, timing_seconds) / seconds_per_image(
        int8, test.pixels, card.input, 1, timing_seconds
    )
    close = int8_accuracy >= fp32_accuracy - INT8_MAX_ACCURACY_DROP
    info = QuantizedInfo(
        file=INT8_FILE,
        sha256=sha256_file(int8_path),
        calibration_images=len(calibration),
        test_accuracy=int8_accuracy,
        fp32_test_accuracy=fp32_accuracy,
        speedup=round(speedup, 3),
        speedup_single=round(speedup_single, 3),
        served=close and speedup >= min_speedup,
    )
    card.quantized = info
    card.save(folder)
    log.info(
        "%s v%s int8: test accuracy %.4f (fp32 %.4f) on %d images, %.2fx faster in batches of 32, %.2fx one at a "
        "time; served: %s%s",
        card.name,
        card.version,
        int8_accuracy,
        fp32_accuracy,
        len(test.labels),
        speedup,
        speedup_single,
        info.served,
        "" if info.served else (" (accuracy drop over 1 point)" if not close else f" (speed-up under {min_speedup})"),
    )
    return info


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(
        prog="python -m training.quantize",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    add_published_model_arguments(parser)
    parser.add_argument("--calibration-images", type=int, default=256, help="validation images to calibrate on")
    parser.add_argument("--method", choices=sorted(METHODS), default="minmax", help="calibration method")
    parser.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True, help="per-channel")
    parser.add_argument("--min-speedup", type=float, default=1.1, help="serve int8 only if at least this much faster")
    parser.add_argument("--seed", type=int, help="split seed (default: the one the card records)")
    args = parser.parse_args(argv)
    try:
        quantize(
            published_model_folder(args),
            args.data,
            calibration_images=args.calibration_images,
            method=args.method,
            per_channel=args.per_channel,
            min_speedup=args.min_speedup,
            seed=args.seed,
            cache_dir=args.cache_dir,
        )
    except (QuantizeError, DataError, FileNotFoundError, ValueError) as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
