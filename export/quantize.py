"""The variants: FP32, dynamic INT8 and the static INT8 recipes (QDQ), each written as its own .onnx file."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

# The candidates by default; the fastest that passes the gate ships.
VARIANTS = ("fp32", "dynamic", "static", "static_u8", "mixed", "mixed_stem_swish")
# Alternatives measured against them (none ran faster than the best candidate on the reference model): built only
# when named with --variants.
EXPERIMENTS = (
    "tiled",
    "mixed_uint8_input",
    "static_qop",
    "static_dedicated",
    "static_no_input_check",
    "float_swish",
)
# What the manifest calls each one: the mixed variants and the experiments are static INT8 with s8 weights too, with
# other nodes left in float or other Q/DQ placement; the export report says which variant it was.
QUANTIZATION_NAMES = {
    "fp32": "fp32",
    "dynamic": "dynamic_int8",
    "static": "static_int8",
    "static_u8": "static_int8_u8",
    "mixed": "static_int8",
    "mixed_stem_swish": "static_int8",
} | dict.fromkeys(EXPERIMENTS, "static_int8")


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


def swish_nodes(graph: onnx.GraphProto) -> list[str]:
    """Every swish activation's Sigmoid and Mul: the pairs Mul(x, Sigmoid(x)), not the squeeze-and-excitation
    gates, whose Mul multiplies by the sigmoid of another tensor."""
    sigmoid_of = {n.output[0]: n for n in graph.node if n.op_type == "Sigmoid"}
    names = []
    for node in graph.node:
        if node.op_type != "Mul":
            continue
        for a, b in (node.input, node.input[::-1]):
            if b in sigmoid_of and sigmoid_of[b].input[0] == a:
                names += [sigmoid_of[b].name, node.name]
                break
    return names


def tile_input_constants(model: onnx.ModelProto, nodes: list[str]) -> int:
    """Repeat the per-channel constants of `nodes` (the float input rescaling) along the width.

    onnxruntime broadcasts a [1, 1, 1, C] constant over an NHWC image in runs of C = 3 elements, which costs
    ~7 ns an element: the rescaling's Add and Mul took 2.1 + 1.7 ms of a 71 ms int8 run (AMD EPYC, one
    thread). Tiled to [1, 1, W, C] the runs are W x C long: 0.12 ms instead of 1.6 ms for the Add
    alone in isolation. Each element still sees the same constant, so the result is bit-identical.
    Returns how many constants were tiled.
    """
    graph = model.graph
    dims = graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[2].HasField("dim_value") or not dims[3].HasField("dim_value"):
        return 0
    width, channels = dims[2].dim_value, dims[3].dim_value
    initializers = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    tiled = 0
    for node in graph.node:
        if node.name not in nodes:
            continue
        for k, name in enumerate(node.input):
            if name not in initializers or channels < 2:
                continue
            value = onnx.numpy_helper.to_array(initializers[name])
            if value.size != channels or value.shape[-1] != channels:
                continue
            table = np.tile(value.reshape(1, 1, 1, channels), (1, 1, width, 1))
            tiled_name = f"{name}_tiled_w{width}"
            if tiled_name not in initializers:
                initializers[tiled_name] = onnx.numpy_helper.from_array(table, tiled_name)
                graph.initializer.append(initializers[tiled_name])
            node.input[k] = tiled_name
            users[name] -= 1
            if users[name] == 0:
                graph.initializer.remove(initializers.pop(name))
            tiled += 1
    return tiled


def image_convs(graph: onnx.GraphProto, max_channels: int = 4) -> list[str]:
    """The convolutions that read an image-like tensor (at most `max_channels` input channels): the stem.

    With a reduction depth of 3 x 3 x 3 = 27, an int8 convolution cannot fill its vector lanes: the
    EfficientNetV2-B3 stem ran 4x slower as QLinearConv than as onnxruntime's float NCHWc Conv (AMD EPYC,
    AVX2), while every deeper convolution ran faster in int8.
    """
    weights = {t.name: t for t in graph.initializer}
    names = []
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        dims = weights[node.input[1]].dims  # (M, C / group, kH, kW)
        if len(dims) == 4 and dims[1] * group <= max_channels:
            names.append(node.name)
    return names


def stem_swish_nodes(graph: onnx.GraphProto) -> list[str]:
    """The swish right after the stem convolution(s), whose input is then already float."""
    stems = {o for n in graph.node if n.name in image_convs(graph) for o in n.output}
    inputs = {n.name: n.input[0] for n in graph.node}
    swish = swish_nodes(graph)
    pairs = [swish[i : i + 2] for i in range(0, len(swish), 2)]
    return [name for sigmoid, mul in pairs if inputs[sigmoid] in stems for name in (sigmoid, mul)]


def uint8_input(model: onnx.ModelProto) -> None:
    """Make the model take uint8 pixels (a quarter of the bytes) and cast them to float inside the graph."""
    graph = model.graph
    name = graph.input[0].name
    cast = f"{name}_as_float"
    for node in graph.node:
        for k, used in enumerate(node.input):
            if used == name:
                node.input[k] = cast
    graph.node.insert(0, onnx.helper.make_node("Cast", [name], [cast], name=cast, to=onnx.TensorProto.FLOAT))
    graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8


@dataclass(frozen=True)
class Recipe:
    """How one static variant is made from the same calibration."""

    weight_type: QuantType = QuantType.QInt8
    quant_format: QuantFormat = QuantFormat.QDQ
    extra_options: dict[str, Any] = field(default_factory=dict)
    float_swish: bool = False  # leave every swish (Sigmoid x Mul) in float
    float_stem: bool = False  # leave image_convs() in float
    float_stem_swish: bool = False  # and the swish after them
    tile_input: bool = False  # tile_input_constants() on the result
    uint8_pixels: bool = False  # uint8_input() on the result


# x86 without VNNI (AVX2) multiplies u8 activations by s8 weights with VPMADDUBSW, whose int16 pair sums
# saturate: full 8-bit s8 weights cost a trained digits CNN 18 points of accuracy there. 7-bit s8 weights
# (reduce_range, which every QInt8 recipe uses) cannot saturate and run at full int8 speed; u8 weights avoid
# it too, ~25% slower on this model but closer on some models. The gate picks.
RECIPES = {
    "static": Recipe(),
    "static_u8": Recipe(weight_type=QuantType.QUInt8),
    "mixed": Recipe(tile_input=True, float_stem=True),
    "mixed_stem_swish": Recipe(tile_input=True, float_stem=True, float_stem_swish=True),
    "tiled": Recipe(tile_input=True),
    "mixed_uint8_input": Recipe(tile_input=True, float_stem=True, uint8_pixels=True),
    # The measured alternatives: not candidates unless asked for by name.
    "static_qop": Recipe(quant_format=QuantFormat.QOperator),
    "static_dedicated": Recipe(extra_options={"DedicatedQDQPair": True}),
    "static_no_input_check": Recipe(extra_options={"ForceQuantizeNoInputCheck": True}),
    "float_swish": Recipe(float_swish=True),
}


def make_variants(fp32_path: Path, calibration: np.ndarray, workdir: Path, wanted: tuple[str, ...]) -> list[Variant]:
    variants = [Variant("fp32", fp32_path)] if "fp32" in wanted else []
    if set(wanted) == {"fp32"}:
        return variants
    # Shape inference plus folding of leftover BatchNorm multiplies: int8 runs ~10% faster after it.
    prepared = workdir / "prepared.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
    prepared_graph = onnx.load(str(prepared)).graph
    keep_float = float_nodes(prepared_graph)
    log.info("kept in float: %s", ", ".join(keep_float) or "nothing")

    if "dynamic" in wanted:
        started = time.perf_counter()
        path = workdir / "dynamic.onnx"
        # QUInt8 weights: QInt8 takes the slow ConvInteger path on x86 (6x slower than fp32 measured).
        quantize_dynamic(str(prepared), str(path), weight_type=QuantType.QUInt8, nodes_to_exclude=keep_float)
        log.info("dynamic int8 in %.1f s", time.perf_counter() - started)
        variants.append(Variant("dynamic", path))

    # Calibrate once: every static recipe quantizes the same prepared model with the same ranges.
    cache = workdir / "calibration.json"
    for name in (n for n in RECIPES if n in wanted):
        recipe = RECIPES[name]
        started = time.perf_counter()
        path = workdir / f"{name}.onnx"
        if not cache.exists():
            log.info("calibrating on %d images (MinMax)...", len(calibration))
        excluded = keep_float + (swish_nodes(prepared_graph) if recipe.float_swish else [])
        excluded += image_convs(prepared_graph) if recipe.float_stem else []
        excluded += stem_swish_nodes(prepared_graph) if recipe.float_stem_swish else []
        quantize_static(
            str(prepared),
            str(path),
            ArrayReader(calibration),
            quant_format=recipe.quant_format,
            per_channel=True,
            reduce_range=recipe.weight_type == QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            weight_type=recipe.weight_type,
            # MinMax: percentile calibration peaked at 8.7 GB RSS on this model, MinMax at 0.75 GB.
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=excluded,
            extra_options=dict(recipe.extra_options),
            calibration_cache_path=cache,
        )
        if recipe.tile_input or recipe.uint8_pixels:
            model = onnx.load(str(path))
            if recipe.tile_input:
                log.info("%s: tiled %d input rescaling constants", name, tile_input_constants(model, keep_float))
            if recipe.uint8_pixels:
                uint8_input(model)
            onnx.checker.check_model(model, full_check=True)
            onnx.save(model, str(path))
        log.info("%s in %.1f s", name, time.perf_counter() - started)
        variants.append(Variant(name, path))
    return variants
