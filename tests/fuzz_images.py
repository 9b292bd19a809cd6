"""Coverage-guided fuzzing (atheris, libFuzzer) of what a client controls: the request body and the image bytes.

    python -m tests.fuzz_images --seconds 120       # each target for 120 s, one after the other
    python -m tests.fuzz_images --seconds 10 --target preprocess

The targets are the entry points of tests/test_fuzz.py: `payload` (service.payload.read_image_bytes on a real
Starlette Request: the first input byte picks the content type, the second the boundary parameter and the
Content-Length, the third how the body is chunked, the rest is the body) and `preprocess`
(service.imaging.preprocess with the committed manifest's preprocessing and MAX_PIXELS = 1 MiB; the input is the
image bytes). The service, Starlette's form parser, python-multipart and Pillow's Python code are instrumented
for coverage; libjpeg, libpng and the other C decoders are not. Each target starts from a corpus of the test
file's seed images.

The contract is the one the tests check: a typed ServiceError or a result, never another exception. Other
exceptions are counted by type and place, the smallest input of each kept (base64), and fuzzing goes on; a
libFuzzer crash (timeout, out of memory) ends that target and is recorded with its output. Writes
benchmarks/results/fuzz.{json,md}.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("payload", "preprocess")
PREFIX = 3  # input bytes that steer the payload target before the body begins


def _payload_input(content_type: int, flags: int, chunking: int, body: bytes) -> bytes:
    return bytes((content_type, flags, chunking)) + body


def seeds(target: str) -> list[bytes]:
    from tests.test_fuzz import MEDIA_TYPES, SEEDS, UNTERMINATED_FILE_PART

    if target == "preprocess":
        return list(SEEDS)
    multipart = b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="car.jpg"\r\n\r\n'
    form, js, raw = (MEDIA_TYPES.index(t) for t in ("multipart/form-data", "application/json", "image/jpeg"))
    found = []
    for image in SEEDS[:4]:
        document = json.dumps({"image": base64.b64encode(image).decode()}).encode()
        found += [
            _payload_input(form, 0b01, 0, multipart + image + b"\r\n--b0undary--\r\n"),
            _payload_input(js, 0, 1, document),
            _payload_input(raw, 0, 2, image),
        ]
    return [*found, _payload_input(0, 0b01, 0, UNTERMINATED_FILE_PART.replace(b"--b\r", b"--b0undary\r"))]


def payload_case(data: bytes) -> tuple[str, bytes, list[int], str | None]:
    """Input bytes -> (content type, body, chunk boundaries, declared Content-Length), for tests.test_fuzz."""
    from tests.test_fuzz import MEDIA_TYPES

    head = data[:PREFIX].ljust(PREFIX, b"\0")
    body = data[PREFIX:]
    media = MEDIA_TYPES[head[0] % len(MEDIA_TYPES)]
    flags = head[1]
    if flags & 0b01:
        media += "; boundary=" + ("b0undary", "x", "", '"')[(flags >> 2) & 0b11]
    if flags & 0b10:
        media += "; charset=no-such-codec"
    declared = (str(len(body)), None, "0", "99999999")[(flags >> 4) & 0b11]
    step = head[2] or len(body) or 1  # 0: the body in one piece
    cuts = list(range(step, len(body), step))[:64]
    return media, body, cuts, declared


class Findings:
    """Exceptions outside the contract, by type and place; the smallest input of each."""

    def __init__(self, target: str, report: Path) -> None:
        self.target = target
        self.report = report
        self.executions = 0
        self.started = time.monotonic()
        self.kinds: dict[str, dict[str, Any]] = {}
        self._saved = 0.0

    def add(self, exc: BaseException, data: bytes) -> None:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        key = f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno} ({frame.name})"
        kind = self.kinds.setdefault(key, {"count": 0, "message": str(exc)[:300], "input_base64": None})
        kind["count"] += 1
        if kind["input_base64"] is None or len(data) < len(base64.b64decode(kind["input_base64"])):
            kind["input_base64"] = base64.b64encode(data[:4096]).decode()
        self.save(force=True)

    def save(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._saved > 1.0:  # libFuzzer ends the process with exit(): keep the file current
            self._saved = now
            state = {"target": self.target, "executions": self.executions, "seconds": round(now - self.started, 1)}
            self.report.write_text(json.dumps({**state, "exceptions": self.kinds}))


def fuzz_one(target: str, seconds: int, report_path: str, corpus_path: str) -> None:
    """Runs in its own process: libFuzzer runs one target per process and exits when done."""
    import atheris

    report, corpus = Path(report_path), Path(corpus_path)

    with atheris.instrument_imports(include=["service", "PIL", "python_multipart", "starlette.formparsers"]):
        import PIL.Image  # noqa: F401
        import python_multipart  # noqa: F401
        import starlette.formparsers  # noqa: F401

        import service.imaging
        import service.payload  # noqa: F401
    from service.errors import ServiceError
    from tests.test_fuzz import fuzz_payload, fuzz_preprocess

    findings = Findings(target, report)
    run = (
        (lambda data: fuzz_payload(*payload_case(data)))
        if target == "payload"
        else (lambda data: fuzz_preprocess(data, 1 << 20))
    )

    def one_input(data: bytes) -> None:
        findings.executions += 1
        try:
            outcome = run(data)
        except Exception as exc:  # the finding: anything but a ServiceError
            findings.add(exc, data)
        else:
            assert isinstance(outcome, (bytes, ServiceError)) or outcome.shape[-1] == 3
        findings.save()

    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds(target)):
        (corpus / f"seed-{i:02d}").write_bytes(seed)
    flags = [
        f"-max_total_time={seconds}",
        "-timeout=20",
        "-rss_limit_mb=3072",
        "-max_len=65536",
        "-print_final_stats=1",
    ]
    atheris.Setup([sys.argv[0], *flags, str(corpus)], one_input)
    atheris.Fuzz()


def markdown(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores, Python "
        f"{m['python']}, {result['fuzzer']}. Contract: a typed ServiceError or a result, never another exception.",
        "",
        "| target | entry point | seconds | executions | executions/s | corpus at end | libFuzzer exit "
        "| exceptions outside the contract |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for t in result["targets"]:
        found = sum(k["count"] for k in t["exceptions"].values())
        rate = round(t["executions"] / t["seconds"], 1) if t["seconds"] else None
        lines.append(
            f"| {t['target']} | {t['entry_point']} | {t['seconds']} | {t['executions']} | {rate} | "
            f"{t['corpus_files']} | {t['returncode']} | {found} in {len(t['exceptions'])} places |"
        )
    for t in result["targets"]:
        for where, kind in t["exceptions"].items():
            lines += ["", f"- {t['target']}: **{where}** x {kind['count']}: {kind['message']}"]
        if t["returncode"] != 0:
            lines += [
                "",
                f"- {t['target']}: libFuzzer ended with {t['returncode']}:",
                "",
                "```",
                t["output_tail"],
                "```",
            ]
    if result.get("notes"):
        lines += ["", *result["notes"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz_images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (default 60)")
    parser.add_argument("--target", choices=TARGETS, action="append", help="one target (repeatable; default both)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    parser.add_argument("--name", default="fuzz", help="result file name (default: fuzz)")
    parser.add_argument("--note", action="append", default=[], help="a line added to the Markdown (repeatable)")
    args = parser.parse_args(argv)

    import atheris

    from benchmarks.harness import command_line, provenance, save

    entry_points = {
        "payload": "service.payload.read_image_bytes (tests.test_fuzz.fuzz_payload)",
        "preprocess": "service.imaging.preprocess (tests.test_fuzz.fuzz_preprocess)",
    }
    result: dict[str, Any] = {
        "name": args.name,
        **provenance(command_line("python -m tests.fuzz_images", argv)),
        "fuzzer": f"atheris {getattr(atheris, '__version__', '3.0.0')} (libFuzzer)",
        "targets": [],
        "notes": args.note,
    }
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        for target in args.target or TARGETS:
            report, corpus = Path(tmp) / f"{target}.json", Path(tmp) / f"corpus-{target}"
            call = f"fuzz_one({target!r}, {args.seconds}, {str(report)!r}, {str(corpus)!r})"
            code = f"from tests.fuzz_images import fuzz_one; {call}"
            print(f"fuzzing {target} for {args.seconds} s...", flush=True)
            done = subprocess.run(
                [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=args.seconds + 600
            )
            state = (
                json.loads(report.read_text()) if report.exists() else {"executions": 0, "seconds": 0, "exceptions": {}}
            )
            output = (done.stdout + done.stderr).strip().splitlines()
            result["targets"].append(
                {
                    "target": target,
                    "entry_point": entry_points[target],
                    **state,
                    "corpus_files": len(list(corpus.iterdir())) if corpus.exists() else 0,
                    "returncode": done.returncode,
                    "final_stats": [line for line in output if line.startswith("stat::")],
                    "output_tail": "\n".join(output[-25:]),
                }
            )  # fmt: skip
    save(args.out, args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
