"""The drift signals in /metrics, from a real server: the top-1 probability and predicted class of every answered
image, and the size, encoded bytes and format of every decoded one."""

from __future__ import annotations

import base64

import httpx
import numpy as np

from service.metrics import INPUT_FORMATS
from tests.helpers import TINY_LABELS, Server, image_bytes, server_metric

MODEL = "tiny-colour-classifier"


def test_answers_and_inputs_are_counted_by_class_confidence_size_and_format(tiny_server: Server) -> None:
    red_png = image_bytes((250, 0, 0), size=(100, 50))
    blue_jpeg = image_bytes((0, 0, 250), size=(200, 100), fmt="JPEG")
    url = tiny_server.url
    assert httpx.post(f"{url}/infer", files=[("image", red_png), ("image", blue_jpeg)]).status_code == 200
    assert httpx.post(f"{url}/infer", files={"image": b"not an image"}).status_code == 400  # never decoded
    pixels = np.full((1, 8, 8, 3), 0.9, dtype=np.float32).tolist()  # pixels: answered, nothing decoded
    oip = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8, 8, 3], "data": pixels}]}
    assert httpx.post(f"{url}/v2/models/{MODEL}/infer", json=oip).status_code == 200
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(red_png).decode()]}
    assert httpx.post(f"{url}/v2/models/{MODEL}/infer", json={"inputs": [image]}).status_code == 200

    red, blue = str(TINY_LABELS.index("red")), str(TINY_LABELS.index("blue"))
    assert server_metric(tiny_server, "predictions_total", class_index=red) == 2
    assert server_metric(tiny_server, "predictions_total", class_index=blue) == 1
    assert server_metric(tiny_server, "prediction_top1_probability_count") == 4
    # The tiny model is sure of a saturated colour: every top-1 probability is in the last bucket.
    assert server_metric(tiny_server, "prediction_top1_probability_bucket", le="0.95") < 4
    assert server_metric(tiny_server, "prediction_top1_probability_bucket", le="1.0") == 4

    assert server_metric(tiny_server, "input_format_total", format="PNG") == 2
    assert server_metric(tiny_server, "input_format_total", format="JPEG") == 1
    others = [fmt for fmt in (*INPUT_FORMATS, "other") if fmt not in ("PNG", "JPEG")]
    assert [server_metric(tiny_server, "input_format_total", format=fmt) for fmt in others] == [0] * len(others)
    assert server_metric(tiny_server, "input_megapixels_count") == 3
    assert abs(server_metric(tiny_server, "input_megapixels_sum") - (2 * 0.005 + 0.02)) < 1e-9
    assert server_metric(tiny_server, "input_bytes_sum") == 2 * len(red_png) + len(blue_jpeg)
    assert server_metric(tiny_server, "input_bytes_bucket", le="1000.0") == 3
