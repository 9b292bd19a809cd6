"""The three variants: FP32, dynamic INT8 and static INT8 (QDQ), each written as its own .onnx file."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.convert import INPUT_NAME

log = logging.getLogger("export")

VARIANTS = ("fp32", "dynamic", "static", "static_u8")
QUANTIZATION_NAMES = {
    "fp32": "fp32",
    "dynamic": "dynamic_int8",
    "static": "static_int8",
    "static_u8": "static_int8_u8",
}


class ArrayReader(CalibrationDataReader):  # type: ignore[misc]
    """Feeds preprocessed calibration images one at a time, as the service will."""

    def __init__(self, arrays: np.ndarray) -> None:
        self._arrays = arrays
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._arrays):
            return None
        batch = self._arrays[self._next : self._next + 1]
        self._next += 1
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._next = 0


@dataclass
class Variant:
    name: str
    path: Path


_ELEMENTWISE = ("Mul", "Add", "Sub", "Div")


def _softmax_nodes(graph: onnx.GraphProto) -> list[str]:
    return [n.name for n in graph.node if n.op_type == "Softmax"]


def _input_rescaling_nodes(graph: onnx.GraphProto) -> list[str]:
    """The in-graph preprocessing: the chain of Mul/Add/Sub/Div by constants that starts at the model input
    (Keras Rescaling and Normalization layers: EfficientNetV2's x / 128 - 1, the digits CNN's x / 127.5 - 1)."""
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    chain, tensor = [], graph.input[0].name
    while len(consumers.get(tensor, [])) == 1:
        (node,) = consumers[tensor]
        others = [name for name in node.input if name != tensor]
        if node.op_type not in _ELEMENTWISE or not all(name in constants for name in others):
            break
        chain.append(node.name)
        tensor = node.output[0]
    return chain


def float_nodes(graph: onnx.GraphProto) -> list[str]:
    """The nodes every static variant leaves unquantized.

    Softmax: quantized, its output moves in steps of 1/255 while a class probability of 1/196 is 0.005.
    The input rescaling: quantized, each of its steps rounds the image once more before the first
    convolution's own input quantization. Measured on the digits CNN (tests/test_digits_accuracy.py,
    static_u8, Xeon with AVX512-VNNI): held-out accuracy 0.9667 with it quantized, 0.9778 without,
    against Keras' 0.9800.
    """
    return _softmax_nodes(graph) + _input_rescaling_nodes(graph)


def make_variants(fp32_path: Path, calibration: np.ndarray, workdir: Path, wanted: tuple[str, ...]) -> list[Variant]:
    variants = [Variant("fp32", fp32_path)] if "fp32" in wanted else []
    if set(wanted) == {"fp32"}:
        return variants
    # Shape inference plus folding of leftover BatchNorm multiplies: int8 runs ~10% faster after it.
    prepared = workdir / "prepared.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
    keep_float = float_nodes(onnx.load(str(prepared)).graph)
    log.info("kept in float: %s", ", ".join(keep_float) or "nothing")

    if "dynamic" in wanted:
        started = time.perf_counter()
        path = workdir / "dynamic.onnx"
        # QUInt8 weights: QInt8 takes the slow ConvInteger path on x86 (6x slower than fp32 measured).
        quantize_dynamic(str(prepared), str(path), weight_type=QuantType.QUInt8, nodes_to_exclude=keep_float)
        log.info("dynamic int8 in %.1f s", time.perf_counter() - started)
        variants.append(Variant("dynamic", path))

    # Two static flavours. x86 without VNNI (AVX2) multiplies u8 activations by s8 weights with
    # VPMADDUBSW, whose int16 pair sums saturate: full 8-bit s8 weights cost a trained digits CNN 18 points
    # of accuracy here. 7-bit s8 weights (reduce_range) cannot saturate and run at full int8 speed;
    # u8 weights avoid it too, ~25% slower on this model but closer on some models. The gate picks.
    for name, weight_type in (("static", QuantType.QInt8), ("static_u8", QuantType.QUInt8)):
        if name not in wanted:
            continue
        started = time.perf_counter()
        path = workdir / f"{name}.onnx"
        log.info("calibrating %s on %d images (MinMax)...", name, len(calibration))
        quantize_static(
            str(prepared),
            str(path),
            ArrayReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=weight_type == QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            weight_type=weight_type,
            # MinMax: percentile calibration peaked at 8.7 GB RSS on this model, MinMax at 0.75 GB.
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=keep_float,
        )
        log.info("%s in %.1f s", name, time.perf_counter() - started)
        variants.append(Variant(name, path))
    return variants
