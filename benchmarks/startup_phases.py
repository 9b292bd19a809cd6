"""What a cold start is made of: each start-up step of `python -m service`, timed one after the other.

    python -m benchmarks.startup_phases                 # 5 fresh processes, about 10 seconds
    python -m benchmarks.startup_phases --processes 2 --out /tmp/x

Each process times, in order and on one thread, the steps that `python -m service` takes: importing
numpy and onnxruntime, importing the web stack, hashing the model, building the onnxruntime session, the
warm-up run. Then, for comparison: the session built again with graph optimization off, the WebSocket
library that uvicorn's `ws="auto"` would import, and the first and second decode of a JPEG. The service
overlaps the session build with the web-stack imports and the first decode; this script runs them apart
to show each one's size.
Medians over fresh processes, committed artifact. Writes results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.payloads import image_paths
from benchmarks.report import provenance, save
from benchmarks.run import ROOT

HERE = Path(__file__).resolve().parent

# Runs in a fresh interpreter: module imports are the thing being measured.
_PROBE = r"""
import json, sys, time
marks = {}
t = time.perf_counter()
def mark(name):
    global t
    now = time.perf_counter()
    marks[name] = (now - t) * 1000
    t = now
import numpy, onnxruntime
mark("import numpy and onnxruntime")
import PIL.Image, prometheus_client, starlette.applications, uvicorn
import service.server
mark("import the web stack (uvicorn, Starlette, Pillow, prometheus-client, service)")
from pathlib import Path
from service.manifest import Manifest, sha256_file
from service.model import Classifier, session_options
artifact = Path(sys.argv[1])
manifest = Manifest.read(artifact)
sha256_file(artifact / manifest.model.file)
mark("read the manifest, sha256 of the model")
session = onnxruntime.InferenceSession(
    str(artifact / manifest.model.file), session_options(1), providers=["CPUExecutionProvider"]
)
mark("build the session")
Classifier(session, manifest, []).warm_up()
mark("warm-up run")
options = session_options(1)
options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
onnxruntime.InferenceSession(str(artifact / manifest.model.file), options, providers=["CPUExecutionProvider"])
mark("(for comparison) build the session with graph optimization off")
try:
    import uvicorn.protocols.websockets.auto
except ImportError:
    pass
mark("(avoided) the WebSocket library uvicorn's ws='auto' imports")
from service.imaging import preprocess
data = Path(sys.argv[2]).read_bytes()
preprocess(data, manifest.preprocessing, 10**9)
mark("first decode of a JPEG")
preprocess(data, manifest.preprocessing, 10**9)
mark("second decode of the same JPEG")
print(json.dumps(marks))
"""


def one_process(artifact: Path, image: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(artifact), str(image)], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    marks: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return marks


def markdown(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores "
        f"available, Python {m['python']}. Median of {result['processes']} fresh processes (one uncounted "
        "first), each step in order on one thread, committed artifact.",
        "",
        "| step | ms (median) | min | max |",
        "|---|---|---|---|",
    ]
    for step, s in result["steps"].items():
        lines.append(f"| {step} | **{s['median']}** | {s['min']} | {s['max']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup_phases", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="startup_phases")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    artifact, image = ROOT / "artifacts", image_paths()[0]
    one_process(artifact, image)  # the page cache, as for every later start
    runs = [one_process(artifact, image) for _ in range(args.processes)]
    steps = {
        step: {
            "median": round(statistics.median(r[step] for r in runs), 1),
            "min": round(min(r[step] for r in runs), 1),
            "max": round(max(r[step] for r in runs), 1),
        }
        for step in runs[0]
    }
    result = {
        **provenance(
            "python -m benchmarks.startup_phases" + (f" --processes {args.processes}" if args.processes != 5 else "")
        ),
        "processes": args.processes,
        "runs": runs,
        "steps": steps,
    }
    save(args.out, args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
