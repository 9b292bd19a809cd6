"""What a cold start is made of: each start-up step of `python -m service`, timed one after the other.

    python -m benchmarks.startup_phases                 # 5 fresh processes, about 10 seconds
    python -m benchmarks.startup_phases --processes 2 --out /tmp/x

Each process times, in order and on one thread, the steps that `python -m service` takes: importing
numpy and onnxruntime, importing the web stack, hashing the model, building the onnxruntime session, the
warm-up run. Then, for comparison: the session built again with graph optimization off, the WebSocket
library that uvicorn's `ws="auto"` would import, and the first and second decode of a JPEG. The service
overlaps the session build with the web-stack imports and the first decode; this script runs them apart
to show each one's size, then, in another fresh process, as `python -m service` runs them (the loader thread
beside the main thread, service/__main__.py) to show which of the two is the critical path.
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
import threading
def loops_while(thread):
    # The same loop both times: how much Python this thread runs while `thread` works.
    thread.start()
    n, start = 0, time.perf_counter()
    while thread.is_alive():
        n += 1
    return n / (time.perf_counter() - start)
alone = loops_while(threading.Thread(target=time.sleep, args=(0.15,)))
beside = loops_while(threading.Thread(target=onnxruntime.InferenceSession, args=(
    str(artifact / manifest.model.file), session_options(1)), kwargs={"providers": ["CPUExecutionProvider"]}))
share = beside / alone
t = time.perf_counter()
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
print(json.dumps({"marks": marks, "python_share_during_build": share}))
"""


# As service/__main__.py runs them: the artifact loaded (hashed, built, warmed) on a thread while the main thread
# imports the web stack and decodes once. Each mark is milliseconds since this probe began.
_OVERLAPPED = r"""
import json, sys, time
began = time.perf_counter()
marks = {}
def mark(name):
    marks[name] = (time.perf_counter() - began) * 1000
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from service.model import Classifier
mark("numpy and onnxruntime imported (service.model)")
def load():
    classifier = Classifier.load(Path(sys.argv[1]), 1, warm=True)
    mark("loader: artifact hashed, session built, warm-up run done")
    return classifier
with ThreadPoolExecutor(1) as loader:
    loading = loader.submit(load)
    from service.imaging import warm_up
    from service.server import serve
    mark("main: web stack imported")
    warm_up()
    mark("main: first decode done")
    loading.result()
mark("both done: the service starts uvicorn")
print(json.dumps(marks))
"""


def overlapped(artifact: Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", _OVERLAPPED, str(artifact)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    marks: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return marks


def _summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        step: {
            "median": round(statistics.median(r[step] for r in runs), 1),
            "min": round(min(r[step] for r in runs), 1),
            "max": round(max(r[step] for r in runs), 1),
        }
        for step in runs[0]
    }


def one_process(artifact: Path, image: Path) -> tuple[dict[str, float], float]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(artifact), str(image)], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["marks"], out["python_share_during_build"]


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
    share = result["python_share_during_build"]
    lines += [
        "",
        "While a second thread builds the session, this thread runs Python at "
        f"**{share['median']:.2f}** of its speed alone (median; {share['min']:.2f}-{share['max']:.2f}): the share "
        "of the build that leaves the GIL free, so the share of it that other start-up work can overlap.",
        "",
        f"Overlapped as `python -m service` runs them (service/__main__.py; {result['processes']} more fresh "
        "processes): milliseconds since the interpreter began running the probe, when each step ended. The later "
        "of the loader and the main thread is the critical path to serving.",
        "",
        "| step ended | ms (median) | min | max |",
        "|---|---|---|---|",
    ]
    for step, s in result["overlapped"].items():
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
    measured = [one_process(artifact, image) for _ in range(args.processes)]
    runs = [marks for marks, _ in measured]
    shares = [share for _, share in measured]
    together = [overlapped(artifact) for _ in range(args.processes)]
    result = {
        **provenance(
            "python -m benchmarks.startup_phases" + (f" --processes {args.processes}" if args.processes != 5 else "")
        ),
        "processes": args.processes,
        "runs": runs,
        "steps": _summary(runs),
        "overlapped_runs": together,
        "overlapped": _summary(together),
        "python_share_during_build": {
            "median": round(statistics.median(shares), 3),
            "min": round(min(shares), 3),
            "max": round(max(shares), 3),
        },
    }
    save(args.out, args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
