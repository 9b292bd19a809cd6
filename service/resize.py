"""TensorFlow's bilinear resize, run by onnxruntime on a tiny committed graph (export/resize_graph.py)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

GRAPH = Path(__file__).resolve().parent / "resize_bilinear_tf.onnx"


@cache
def _session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    # Called from the decode threads, each of which is one request's worth of work: more threads per call
    # would only contend with inference for the same cores.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The float cast holds 12 bytes per source pixel: an arena would keep the largest ever seen (480 MB after
    # one 40-megapixel PNG) for the life of the process. Without it the call costs 0.05 ms more.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return ort.InferenceSession(str(GRAPH), options, providers=["CPUExecutionProvider"])


def resize_bilinear_tf(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize HxWxC uint8 like `tf.image.resize(x, (height, width))`: bilinear, half-pixel centres, no antialias.

    Trained Keras pipelines resize this way; Pillow's bilinear antialiases when it downsamples, which shifts
    the input away from what the network saw in training. Returns (height, width, C) float32 on 0..255.
    """
    sizes = np.array([1, height, width, pixels.shape[2]], dtype=np.int64)
    (resized,) = _session().run(None, {"image": pixels[None], "sizes": sizes})
    out: np.ndarray = resized[0]
    return out
