"""The ONNX graph behind the service's `bilinear_tf` resize: uint8 image in, TF-style bilinear float out.

    python -m export.resize_graph      # rewrites service/resize_bilinear_tf.onnx (committed)

The service runs this graph with onnxruntime instead of a numpy kernel: onnxruntime's Resize is a
single pass in C++ with no temporaries, which saved about 1 ms of decode CPU per request (see
benchmarks/results/ab-resize.md). It is built here, where the `onnx` package is installed, and
committed, so the serve path needs nothing but onnxruntime. A test checks the committed bytes against
`build()`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

PATH = Path(__file__).resolve().parents[1] / "service" / "resize_bilinear_tf.onnx"
OPSET = 18  # Resize's attributes as used below exist since opset 11; 18 is what onnxruntime >= 1.14 runs
IR_VERSION = 8  # pinned (not onnx's newest) so that the bytes, and the test that compares them, stay put


def build() -> onnx.ModelProto:
    """`image` uint8 [1, H, W, C] and `sizes` int64 [4] -> `resized` float32 [1, h, w, C].

    Resize with mode "linear" and "half_pixel" coordinates, no antialias, is `tf.image.resize(x, size)`'s
    bilinear kernel: sample centres at (i + 0.5) * in / out - 0.5, clamped to the edge.
    """
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node(
            "Resize",
            ["pixels", "", "", "sizes"],
            ["resized"],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "resize_bilinear_tf",
        [
            helper.make_tensor_value_info("image", TensorProto.UINT8, [1, "height", "width", "channels"]),
            helper.make_tensor_value_info("sizes", TensorProto.INT64, [4]),
        ],
        [helper.make_tensor_value_info("resized", TensorProto.FLOAT, [1, "out_height", "out_width", "channels"])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="car-classifier export.resize_graph",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def serialized() -> bytes:
    return build().SerializeToString(deterministic=True)


def main() -> int:
    PATH.write_bytes(serialized())
    print(f"wrote {PATH} ({PATH.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
