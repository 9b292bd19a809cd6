"""A small trained model on real images: scikit-learn's digits, and a CNN made of EfficientNetV2's blocks.

Used by tests/test_digits_accuracy.py: the one accuracy claim this project makes comes from this model.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.imaging import preprocess
from service.manifest import Preprocessing

SIZE = 32
SPEC = Preprocessing(height=SIZE, width=SIZE)


def to_png(pixels: np.ndarray) -> bytes:
    # digits are 8x8 greyscale on 0..16; store them as the 0..255 greyscale PNGs a user would have.
    buffer = BytesIO()
    Image.fromarray(np.rint(pixels * (255 / 16)).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_pngs(folder: Path, blobs: list[bytes]) -> Path:
    folder.mkdir(parents=True)
    for i, blob in enumerate(blobs):
        (folder / f"{i:04d}.png").write_bytes(blob)
    return folder


def split() -> tuple[list[bytes], list[bytes], np.ndarray, np.ndarray]:
    """Train and held-out PNGs with their labels (75/25, stratified, fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    return [to_png(x) for x in x_train], [to_png(x) for x in x_test], y_train, y_test


def arrays(blobs: list[bytes]) -> np.ndarray:
    """Exactly what the service feeds: the same decode, greyscale->RGB and resize."""
    return np.stack([preprocess(b, SPEC, 10**9) for b in blobs])


def build_model(classes: int = 10) -> Any:
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


def train(train_arrays: np.ndarray, labels: np.ndarray, epochs: int = 20, batch: int = 32) -> Any:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    model = build_model(int(labels.max()) + 1)
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=epochs * -(-len(train_arrays) // batch))
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy")
    model.fit(train_arrays, labels, epochs=epochs, batch_size=batch, verbose=0)
    return model
