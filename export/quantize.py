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

VARIANTS = ("fp32", "dynamic", "static")
QUANTIZATION_NAMES = {"fp32": "fp32", "dynamic": "dynamic_int8", "static": "static_int8"}


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


def _softmax_nodes(model_path: Path) -> list[str]:
    return [n.name for n in onnx.load(str(model_path)).graph.node if n.op_type == "Softmax"]


def make_variants(fp32_path: Path, calibration: np.ndarray, workdir: Path, wanted: tuple[str, ...]) -> list[Variant]:
    variants = [Variant("fp32", fp32_path)] if "fp32" in wanted else []
    if not {"dynamic", "static"} & set(wanted):
        return variants
    # Shape inference plus folding of leftover BatchNorm multiplies: int8 runs ~10% faster after it.
    prepared = workdir / "prepared.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
    # Softmax stays float: quantized, its output moves in steps of 1/255 while a class probability of
    # 1/196 is 0.005.
    keep_float = _softmax_nodes(prepared)

    if "dynamic" in wanted:
        started = time.perf_counter()
        path = workdir / "dynamic.onnx"
        # QUInt8 weights: QInt8 takes the slow ConvInteger path on x86 (6x slower than fp32 measured).
        quantize_dynamic(str(prepared), str(path), weight_type=QuantType.QUInt8, nodes_to_exclude=keep_float)
        log.info("dynamic int8 in %.1f s", time.perf_counter() - started)
        variants.append(Variant("dynamic", path))

    if "static" in wanted:
        started = time.perf_counter()
        path = workdir / "static.onnx"
        log.info("calibrating static int8 on %d images (MinMax)...", len(calibration))
        quantize_static(
            str(prepared),
            str(path),
            ArrayReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # MinMax: percentile calibration peaked at 8.7 GB RSS on this model, MinMax at 0.75 GB.
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=keep_float,
        )
        log.info("static int8 in %.1f s", time.perf_counter() - started)
        variants.append(Variant("static", path))
    return variants
