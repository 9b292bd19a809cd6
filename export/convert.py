"""Keras -> ONNX with tf2onnx: one float32 NHWC input with a dynamic batch dimension, checked."""

from __future__ import annotations

import logging
import time
from typing import Any

import onnx

log = logging.getLogger("export")

OPSET = 17
INPUT_NAME = "input"
BATCH_DIM = "batch"


def keras_input_shape(model: Any) -> tuple[int, int, int]:
    shape = [None if d is None else int(d) for d in model.inputs[0].shape]
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ValueError(f"expected a model with one (batch, height, width, channels) input, got {shape}")
    _, height, width, channels = shape
    if channels != 3:
        raise ValueError(f"expected an RGB model (3 channels last), got input shape {shape}")
    return height, width, channels  # type: ignore[return-value]


def to_onnx(model: Any) -> onnx.ModelProto:
    import tensorflow as tf
    import tf2onnx

    height, width, channels = keras_input_shape(model)
    signature = [tf.TensorSpec((None, height, width, channels), tf.float32, name=INPUT_NAME)]
    started = time.perf_counter()
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET)
    log.info("converted to ONNX opset %d in %.1f s", OPSET, time.perf_counter() - started)

    # tf2onnx can convert without error yet turn layer state (a Normalization's mean and variance)
    # into extra graph inputs; such a model needs inputs nobody will feed.
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"the ONNX model has {len(inputs)} inputs ({[i.name for i in inputs]}), expected exactly 1")
    # The dynamic batch dimension comes out named `unk__NNNN`; give it a name that says what it is.
    for value in [inputs[0], *proto.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = BATCH_DIM
    onnx.checker.check_model(proto, full_check=True)
    return proto


def output_kind(proto: onnx.ModelProto) -> str:
    """`probabilities` if the graph ends in Softmax, else `logits` (the service applies softmax)."""
    (output,) = proto.graph.output
    producer = {out: node for node in proto.graph.node for out in node.output}
    node = producer.get(output.name)
    while node is not None and node.op_type == "Identity":  # tf2onnx may leave Identity after the last op
        node = producer.get(node.input[0])
    return "probabilities" if node is not None and node.op_type == "Softmax" else "logits"
