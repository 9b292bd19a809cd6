"""The seed project's way of serving, kept as a yardstick (not part of the product).

FastAPI, one uvicorn worker, a synchronous `def infer(image: UploadFile)` that opens the upload with Pillow,
resizes to 300x300 with Pillow's default filter and calls Keras `model.predict` on a batch of one, as the
original did. The model is the same architecture as the shipped artifact (EfficientNetV2-B3, 196 classes,
seeded untrained weights: speed does not depend on the weights).

    SEED_MODE=predict      the original's path: model.predict per request
    SEED_MODE=tf_function  a fairer TensorFlow: the same model called through a compiled tf.function

    uvicorn benchmarks.baselines.seed_server:app --port 4001 --workers 1
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, UploadFile
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

MODE = os.environ.get("SEED_MODE", "predict")
LABELS = (Path(__file__).resolve().parents[2] / "artifacts" / "labels.txt").read_text().splitlines()

keras.utils.set_random_seed(0)
model = keras.applications.EfficientNetV2B3(weights=None, classes=196, input_shape=(300, 300, 3))
compiled = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
app = FastAPI()


def _predict(x: np.ndarray) -> Any:
    if MODE == "tf_function":
        return compiled(tf.constant(x)).numpy()
    return model.predict(x, verbose=0)


_predict(np.zeros((1, 300, 300, 3), dtype=np.float32))


@app.get("/")
def home() -> dict[str, str]:
    return {"status": "The car classification service is running!"}


@app.get("/ping")
def ping() -> dict[str, str]:
    return {"message": "pong"}


@app.post("/infer")
def infer(image: UploadFile) -> dict[str, str]:
    img = Image.open(image.file).resize((300, 300))
    x = np.asarray(img, dtype=np.float32)[None]
    return {"class": LABELS[int(np.argmax(_predict(x)))]}
