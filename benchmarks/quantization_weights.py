"""Why the export offers two static INT8 flavours: accuracy of a trained model under each weight encoding.

    python -m benchmarks.quantization_weights        (needs requirements-dev.txt; about 1 minute)

Trains the digits CNN of tests/digits.py, then quantizes it statically (QDQ, per-channel, u8 activations,
MinMax on 200 training images, Softmax and the input rescaling left float as the export does) with full
8-bit s8 weights, 7-bit s8 weights (reduce_range) and u8 weights, and measures held-out accuracy and top-1
agreement with Keras. Writes results/quantization_weights.{json,md}.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from benchmarks import machine
from benchmarks.report import save
from export.convert import to_onnx
from export.parity import onnx_predict
from export.quantize import ArrayReader, float_nodes
from tests import digits

RESULTS = Path(__file__).parent / "results"
FLAVOURS = {
    "s8 weights, 8-bit": (QuantType.QInt8, False),
    "s8 weights, 7-bit (reduce_range): export variant `static`": (QuantType.QInt8, True),
    "u8 weights: export variant `static_u8`": (QuantType.QUInt8, False),
}


def main() -> None:
    train_blobs, test_blobs, y_train, y_test = digits.split()
    train, test = digits.arrays(train_blobs), digits.arrays(test_blobs)
    model = digits.train(train, y_train)
    keras_pred = model.predict(test, verbose=0).argmax(-1)
    rows = [{"weights": "Keras (float32)", "accuracy": float((keras_pred == y_test).mean()), "agreement": 1.0}]
    with tempfile.TemporaryDirectory() as work:
        fp32, prepared = Path(work) / "fp32.onnx", Path(work) / "prepared.onnx"
        onnx.save(to_onnx(model), str(fp32))
        quant_pre_process(str(fp32), str(prepared))
        keep_float = float_nodes(onnx.load(str(prepared)).graph)  # as the export does
        for name, (weight_type, reduce_range) in FLAVOURS.items():
            out = Path(work) / "int8.onnx"
            quantize_static(
                str(prepared),
                str(out),
                ArrayReader(train[:200]),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=weight_type,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=keep_float,
            )
            pred = onnx_predict(out, test).argmax(-1)
            rows.append(
                {
                    "weights": name,
                    "accuracy": float((pred == y_test).mean()),
                    "agreement": float((pred == keras_pred).mean()),
                }
            )
    result = {"cpu": machine.cpu_model(), "vnni": machine.cpu_has_vnni(), "held_out_images": len(y_test), "rows": rows}
    lines = [
        f"Digits CNN, {len(y_test)} held-out images, on {result['cpu']} (VNNI: {'yes' if result['vnni'] else 'no'}).",
        "Command: `python -m benchmarks.quantization_weights`",
        "",
        "| weights | held-out accuracy | top-1 agreement with Keras |",
        "|---|---|---|",
        *(f"| {r['weights']} | {r['accuracy']:.4f} | {r['agreement']:.4f} |" for r in rows),
    ]
    save(RESULTS, "quantization_weights", result, lines)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
