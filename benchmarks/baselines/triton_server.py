"""Triton Inference Server, the server users most often pick instead of ours, kept as a yardstick (benchmarks only).

pytriton (the `nvidia-pytriton` wheel, which ships the Triton binary) binds a Python callable as a Triton model:
it decodes each JPEG as the naive server does (service.imaging.preprocess, same artifact), then makes one
onnxruntime run per batch. Triton serves it with two model instances (each its own session, the cores shared out
as intra-op threads: 1 each on 2 cores) and dynamic batching (up to 8 queued requests, no added delay); settings:
TRITON_* below, or the flags. Clients speak the Open Inference Protocol over HTTP: the JPEG as a BYTES input
`image` [1, 1] in binary tensor data, the probabilities back as a binary FP32 output. Its own venv, from
Debian's Python (benchmarks/requirements-triton.txt, docs/benchmarks.md):

    .venv-triton/bin/python -m benchmarks.baselines.triton_server --port 4002
    python -m benchmarks.sweep --triton .venv-triton/bin/python

Stops on SIGTERM or SIGINT, tritonserver and its stubs with it. The top level needs only the standard library:
the sweep and the Locust user import `oip_request` from here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODEL = "car_classifier"
INPUT = "image"
OUTPUT = "probabilities"
INFER_PATH = f"/v2/models/{MODEL}/infer"
ROOT = Path(__file__).resolve().parents[2]
# The model's settings, from the environment (the sweep passes its own to the launcher) or these defaults.
DEFAULTS = {"TRITON_INSTANCES": 2, "TRITON_MAX_BATCH": 8, "TRITON_QUEUE_DELAY_US": 0, "TRITON_INTRA_OP_THREADS": 0}


def settings(environ: Mapping[str, str]) -> dict[str, int]:
    """The settings in force; TRITON_INTRA_OP_THREADS 0 resolves to the cores shared out among the instances."""
    values = {name: int(environ.get(name, default)) for name, default in DEFAULTS.items()}
    if values["TRITON_INTRA_OP_THREADS"] <= 0:
        # Two instances of onnxruntime's default (a thread per core each) put 4 threads on 2 cores: 27-31 answers/s
        # at 8 clients, against 48 with one thread each (one check each, large set, under load; docs/benchmarks.md).
        cores = len(os.sched_getaffinity(0))
        values["TRITON_INTRA_OP_THREADS"] = max(1, cores // max(1, values["TRITON_INSTANCES"]))
    return values


def describe(values: Mapping[str, int]) -> str:
    """One line for a result file: what the Triton model ran with."""
    return (
        f"{values['TRITON_INSTANCES']} model instances (one onnxruntime session each, "
        f"{values['TRITON_INTRA_OP_THREADS']} intra-op thread(s), other options default), "
        f"dynamic batching up to {values['TRITON_MAX_BATCH']} requests (max_queue_delay "
        f"{values['TRITON_QUEUE_DELAY_US']} us), HTTP only"
    )


def oip_request(image: bytes) -> tuple[bytes, dict[str, str]]:
    """An Open Inference Protocol request for one JPEG, as tritonclient.http builds it: a JSON header, then the
    BYTES element (4-byte little-endian length + the file) as binary tensor data; the output asked for binary."""
    element = struct.pack("<I", len(image)) + image
    header = json.dumps(
        {
            "inputs": [
                {"name": INPUT, "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(element)}}
            ],
            "outputs": [{"name": OUTPUT, "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return header + element, headers


def oip_answer_error(body: bytes, header_length: str | None) -> str | None:
    """None when `body` is an OIP answer carrying the probabilities output; otherwise what is wrong with it."""
    try:
        size = int(header_length) if header_length is not None else len(body)
        answer = json.loads(body[:size])
    except ValueError:
        return "answer header is not JSON"
    outputs = answer.get("outputs") if isinstance(answer, dict) else None
    first = outputs[0] if isinstance(outputs, list) and outputs else None
    if not isinstance(first, dict) or first.get("name") != OUTPUT:
        return f"no {OUTPUT!r} output in {str(answer)[:200]}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baselines.triton_server", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "4002")), help="HTTP (OIP) port")
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", ROOT / "artifacts")))
    env = settings(os.environ)
    parser.add_argument("--instances", type=int, default=env["TRITON_INSTANCES"])
    parser.add_argument("--max-batch", type=int, default=env["TRITON_MAX_BATCH"])
    parser.add_argument(
        "--queue-delay-us",
        type=int,
        default=env["TRITON_QUEUE_DELAY_US"],
        help="dynamic batcher's max_queue_delay_microseconds (0: batch only what is already queued)",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=int(os.environ.get("TRITON_INTRA_OP_THREADS", "0")),
        help="each instance's onnxruntime intra_op_num_threads (0, the default: the cores shared out among the "
        "instances)",
    )
    args = parser.parse_args(argv)
    resolved = settings(
        {"TRITON_INSTANCES": str(args.instances), "TRITON_INTRA_OP_THREADS": str(args.intra_op_threads)}
    )
    args.intra_op_threads = resolved["TRITON_INTRA_OP_THREADS"]

    # Imported here: the sweep and the Locust user import this module for oip_request, without these packages.
    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from service.imaging import preprocess
    from service.manifest import Manifest

    manifest = Manifest.read(args.model_dir)
    max_pixels = 40_000_000  # the service's default MAX_IMAGE_PIXELS: the same images pass

    def instance() -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.intra_op_threads
        model = str(args.model_dir / manifest.model.file)
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

        @batch
        def infer(image: Any) -> dict[str, Any]:
            # image: object array [B, 1] of bytes, one JPEG per request the dynamic batcher put together.
            pixels = np.stack([preprocess(bytes(row[0]), manifest.preprocessing, max_pixels) for row in image])
            if manifest.input.layout == "NCHW":
                pixels = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
            (out,) = session.run([manifest.output.name], {manifest.input.name: pixels})
            scores = np.asarray(out, dtype=np.float32)
            if manifest.output.kind == "logits":
                scores = np.exp(scores - scores.max(axis=1, keepdims=True))
                scores /= scores.sum(axis=1, keepdims=True)
            return {OUTPUT: scores}

        return infer

    # SIGTERM (benchmarks.harness.stop) takes the same path as Ctrl-C: pytriton's serve() then stops tritonserver.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    config = TritonConfig(
        http_address=args.host,
        http_port=args.port,
        allow_grpc=False,
        allow_metrics=False,
        log_verbose=0,
        # benchmarks.harness.stop() kills the launcher after 30 s, which would orphan tritonserver: it must be gone
        # before that, in-flight requests or not (the sweep stops it only once Locust has finished).
        exit_timeout_secs=10,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL,
            infer_func=[instance() for _ in range(args.instances)],
            inputs=[Tensor(name=INPUT, dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name=OUTPUT, dtype=np.float32, shape=(-1,))],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us),
            ),
            strict=False,
        )
        triton.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
