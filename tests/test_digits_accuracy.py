"""Does INT8 keep a trained model's accuracy? A real answer on real images that ship with scikit-learn.

A small Keras CNN built from the blocks that make EfficientNetV2 hard to quantize (in-graph rescaling,
depthwise convolutions, BatchNorm, swish, squeeze-and-excitation) is trained for a few seconds on the digits
dataset, exported to static INT8 calibrated on the training split, and judged on the held-out split.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorflow", reason="needs the export requirements (TensorFlow)")
pytest.importorskip("sklearn", reason="needs scikit-learn for the digits images")
pytestmark = [pytest.mark.export, pytest.mark.slow]

SIZE = 32


def _png(pixels: np.ndarray) -> bytes:
    # digits are 8x8 greyscale on 0..16; store them as the 0..255 greyscale PNGs a user would have.
    buffer = BytesIO()
    Image.fromarray(np.rint(pixels * (255 / 16)).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _write(folder: Path, images: np.ndarray) -> list[bytes]:
    folder.mkdir()
    blobs = [_png(img) for img in images]
    for i, blob in enumerate(blobs):
        (folder / f"{i:04d}.png").write_bytes(blob)
    return blobs


def _model(classes: int):  # type: ignore[no-untyped-def]
    import keras
    from keras import layers

    # BatchNormalization(momentum=0.9): with 1,347 images an epoch is 43 steps, and at the default 0.99 the
    # moving variance still remembers its initial 1.0 after training (measured 10x the real variance).

    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = layers.Conv2D(24, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.Activation("swish")(x)
    for filters, stride in ((32, 2), (48, 2)):
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.Activation("swish")(x)
        squeeze = layers.GlobalAveragePooling2D(keepdims=True)(x)
        squeeze = layers.Conv2D(8, 1, activation="swish")(squeeze)
        squeeze = layers.Conv2D(x.shape[-1], 1, activation="sigmoid")(squeeze)
        x = layers.Multiply()([x, squeeze])
        x = layers.Conv2D(filters, 1, use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.Activation("swish")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def test_int8_keeps_the_accuracy_of_a_trained_model(tmp_path: Path, record_property: object) -> None:
    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from export.parity import Thresholds
    from export.pipeline import ExportConfig, run_export
    from service.imaging import preprocess
    from service.manifest import Preprocessing
    from service.model import Classifier

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    train_blobs = _write(tmp_path / "train", x_train)
    test_blobs = _write(tmp_path / "test", x_test)

    # Train on exactly what the service will feed: the same decode, greyscale->RGB and resize.
    spec = Preprocessing(height=SIZE, width=SIZE)
    train = np.stack([preprocess(b, spec, 10**9) for b in train_blobs])
    test = np.stack([preprocess(b, spec, 10**9) for b in test_blobs])

    import tensorflow as tf

    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    model = _model(10)
    epochs, batch = 20, 32
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=epochs * -(-len(train) // batch))
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy")
    model.fit(train, y_train, epochs=epochs, batch_size=batch, verbose=0)
    keras_accuracy = float((model.predict(test, verbose=0).argmax(-1) == y_test).mean())
    assert keras_accuracy > 0.9, f"the Keras model did not train ({keras_accuracy:.3f})"
    model_path = tmp_path / "digits.keras"
    model.save(model_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(str(d) for d in range(10)) + "\n")

    out = tmp_path / "artifact"
    manifest = run_export(
        ExportConfig(
            out=out,
            keras_model=model_path,
            labels=labels,
            calibration_dir=tmp_path / "train",
            calibration_count=200,
            validation_dir=tmp_path / "test",
            validation_count=len(test_blobs),
            # The bar, as the gate: the export must find a static int8 variant that meets it.
            thresholds=Thresholds(min_top1_agreement=0.98),
            variants=("static", "static_u8"),
        )
    )
    assert manifest.model.quantization in ("static_int8", "static_int8_u8"), manifest.export["variants"]

    classifier = Classifier.load(out, threads=1)
    int8 = np.concatenate([classifier.predict(test[i : i + 64]) for i in range(0, len(test), 64)])
    int8_accuracy = float((int8.argmax(-1) == y_test).mean())
    keras_pred = model.predict(test, verbose=0).argmax(-1)
    agreement = float((int8.argmax(-1) == keras_pred).mean())
    record_property("digits", {"keras": keras_accuracy, "int8": int8_accuracy, "agreement": agreement})
    print(
        f"digits held-out ({len(y_test)} images): keras {keras_accuracy:.4f}, int8 {int8_accuracy:.4f}, "
        f"top-1 agreement {agreement:.4f}"
    )
    assert abs(int8_accuracy - keras_accuracy) <= 0.01
    assert agreement >= 0.98
    static = next(v for v in manifest.export["variants"] if v["name"] == manifest.export["selected"])
    assert static["parity"]["top1_agreement"] == pytest.approx(agreement, abs=1e-6)
