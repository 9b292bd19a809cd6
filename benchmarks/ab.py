"""A/B of service configurations or code: interleaved rounds under the same Locust load, throughput and CPU.

    python -m benchmarks.ab --variant "" --variant "WORKERS=4"             # 4 rounds, about 5 minutes
    python -m benchmarks.ab --variant "" --variant "DECODE_THREADS=1" --rounds 6 --name ab-decode-threads
    python -m benchmarks.ab --variant "@HEAD~1" --variant ""               # the last commit against its parent
    python -m benchmarks.ab --variant "" --variant "@HEAD~1" --users 32    # the same, at another point of the curve

Each variant is a space-separated list of environment settings for `python -m service` ("" = the defaults),
optionally with one `@REV`: the service's code then comes from that git revision (`git archive REV service`),
while the artifact, the load and the harness stay the working tree's, so a code change is measured alone.
Every round runs each variant once, in an order that alternates from round to round (A B, B A, ...), so a
machine that speeds up or slows down during the run favours neither. Each run: fresh server, uncounted
warm-up, then --users Locust users (8 by default); throughput and CPU per answered request come from a
steady-state window (benchmarks/window.py). The summary is the median over rounds of each variant's ratio to
the first one, measured in the same round. Writes results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import payloads, window
from benchmarks.report import command_line, provenance, save
from benchmarks.run import ROOT, service_under_load

HERE = Path(__file__).resolve().parent
USERS = 8  # where the curve bends on 2 cores: both cores busy, a short queue
# Git refuses a repository owned by another user ("dubious ownership": a checkout mounted into a container, a CI
# workspace). The only repository asked is the one this code runs from, which is trusted already.
GIT = ("git", "-c", "safe.directory=*")
ROLES = ("inference", "decode", "event loop", "other", "load generator")
T = TypeVar("T")


@dataclass(frozen=True)
class Variant:
    env: dict[str, str] = field(default_factory=dict)
    revision: str | None = None  # a commit, as its short hash; None: the working tree

    @property
    def label(self) -> str:
        parts = ([f"@{self.revision}"] if self.revision else []) + [f"{k}={v}" for k, v in self.env.items()]
        return " ".join(parts) or "defaults"


def _short_hash(revision: str) -> str:
    found = subprocess.run(
        [*GIT, "rev-parse", "--short", "--verify", f"{revision}^{{commit}}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if found.returncode != 0:
        raise argparse.ArgumentTypeError(f"{revision!r} is not a commit of this repository")
    return found.stdout.strip()


def parse_variant(text: str) -> Variant:
    env, revision = {}, None
    for item in text.split():
        if item.startswith("@"):
            if revision is not None:
                raise argparse.ArgumentTypeError(f"{text!r} names more than one revision")
            revision = _short_hash(item[1:])
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE or @REVISION")
        env[key] = value
    return Variant(env, revision)


def add_variant_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variant", action="append", type=parse_variant, required=True, help='e.g. "", "WORKERS=4", "@HEAD~1"'
    )


def checkout_service(revision: str, into: Path) -> Path:
    """`service/` as it was at `revision`, in a folder of its own; the folder to run `python -m service` in."""
    archive = subprocess.run([*GIT, "archive", "--format=tar", revision, "service"], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {revision} service: {archive.stderr.decode().strip()}")
    code = into / f"rev-{revision}"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(code, filter="data")
    return code


def service_code(variants: list[Variant], work: Path) -> dict[str, Path]:
    """Each variant's folder to run `python -m service` in: its revision's checkout, or the working tree."""
    return {v.label: checkout_service(v.revision, work) if v.revision else ROOT for v in variants}


def alternating(variants: list[T], round_index: int) -> list[T]:
    """A B, B A, A B...: a machine that speeds up or slows down during the run favours no variant."""
    return variants if round_index % 2 == 0 else variants[::-1]


def add_run_options(parser: argparse.ArgumentParser, *, rounds: int, seconds: int, name: str) -> None:
    """The options of a harness that runs variants in interleaved rounds (this one, benchmarks.libraries)."""
    add_variant_option(parser)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--seconds", type=int, default=seconds, help="each run's Locust phase")
    parser.add_argument("--users", type=int, default=USERS, help="Locust users (concurrent clients) in each run")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default=name)


def check_seconds(parser: argparse.ArgumentParser, seconds: float) -> None:
    if seconds < window.SETTLE_S + window.TAIL_S + 6:
        parser.error(f"--seconds must be at least {window.SETTLE_S + window.TAIL_S + 6:g}")


def interleaved(
    variants: list[Variant], rounds: int, run: Callable[[Variant, Path, Path, str], dict[str, Any]]
) -> list[dict[str, Any]]:
    """`rounds` rounds, each running every variant once in alternating order: `run(variant, code, work, tag)`,
    with `code` the folder to run its `python -m service` in and `work` a scratch folder for the whole run."""
    done = []
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        work = Path(tmp)
        code = service_code(variants, work)
        for i in range(rounds):
            order = alternating(variants, i)
            runs = {}
            for j, v in enumerate(order):
                runs[v.label] = run(v, code[v.label], work, f"round{i}-{j}")
                print(f"round {i} {v.label}: {runs[v.label].get('window')}", flush=True)
            done.append({"round": i, "order": [v.label for v in order], "runs": runs})
    return done


def save_rounds(
    args: argparse.Namespace,
    prog: str,
    argv: list[str] | None,
    rounds: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    to_markdown: Callable[[dict[str, Any]], list[str]],
    **extra: Any,
) -> None:
    """Writes a harness's interleaved rounds and their summary, with what ran them, to --out/--name.{json,md}."""
    variants: list[Variant] = args.variant
    result = {
        **provenance(command_line(prog, argv)),
        "seconds": args.seconds,
        **extra,
        "variants": [v.label for v in variants],
        "rounds": rounds,
        "summary": summary,
    }
    save(args.out, args.name, result, to_markdown(result))


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def summarize(variants: list[Variant], rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for variant in variants:
        name = variant.label
        runs = [r["runs"][name] for r in rounds]
        firsts = [r["runs"][variants[0].label] for r in rounds]
        windows, first_windows = [r["window"] for r in runs], [r["window"] for r in firsts]
        cpu = {role: statistics.median(w["cpu_ms_per_request"][role] for w in windows) for role in ROLES}
        total = [w["cpu_ms_per_request"]["all"] for w in windows]
        first_total = [w["cpu_ms_per_request"]["all"] for w in first_windows]
        throughput = [
            _ratio(w["answered_per_s"], f["answered_per_s"]) for w, f in zip(windows, first_windows, strict=True)
        ]
        cpu_ratio = [_ratio(t, f) for t, f in zip(total, first_total, strict=True)]
        out.append(
            {
                "variant": name,
                "answered_per_s": round(statistics.median(w["answered_per_s"] for w in windows), 2),
                "p99_over_p50": round(statistics.median(r["p99_over_p50"] or 0 for r in runs), 2),
                "errors": sum(r["errors"] for r in runs),
                "cpu_ms_per_request": {k: round(v, 2) for k, v in cpu.items()},
                "cpu_ms_per_request_total": round(statistics.median(total), 2),
                "throughput / first": round(statistics.median(x for x in throughput if x is not None), 3),
                "throughput / first by round": throughput,
                "cpu per request / first": round(statistics.median(x for x in cpu_ratio if x is not None), 3),
            }
        )
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    first = result["summary"][0]["variant"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores "
        f"available, Python {m['python']}. {len(result['rounds'])} rounds; each run: fresh server, "
        f"{result.get('users', USERS)} Locust users for {result['seconds']} s on the same cores, 48 distinct JPEGs; "
        "throughput and CPU from the steady-state window counted by the service's /metrics.",
        "",
        f"| variant | answered/s (median) | throughput / {first} (median of rounds) | by round | p99/p50 | errors "
        "| CPU ms/request: inference | decode | event loop | other | load generator | total "
        f"| CPU per request / {first} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        c = s["cpu_ms_per_request"]
        by_round = ", ".join(str(x) for x in s["throughput / first by round"])
        lines.append(
            f"| {s['variant']} | {s['answered_per_s']} | **{s['throughput / first']}** | {by_round} | "
            f"{s['p99_over_p50']} | {s['errors']} | {c['inference']} | {c['decode']} | {c['event loop']} | "
            f"{c['other']} | {c['load generator']} | {s['cpu_ms_per_request_total']} | {s['cpu per request / first']} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0])
    add_run_options(parser, rounds=4, seconds=30, name="ab")
    args = parser.parse_args(argv)
    variants: list[Variant] = args.variant
    if len(variants) < 2 or len({v.label for v in variants}) != len(variants):
        parser.error("give at least two different --variant")
    check_seconds(parser, args.seconds)
    if args.users < 1:
        parser.error("--users must be at least 1")

    images = payloads.image_bytes()

    def run(variant: Variant, code: Path, work: Path, tag: str) -> dict[str, Any]:
        return service_under_load(variant.env, images, args.seconds, work, tag, args.users, code)

    rounds = interleaved(variants, args.rounds, run)
    save_rounds(args, "python -m benchmarks.ab", argv, rounds, summarize(variants, rounds), markdown, users=args.users)
    return 0


if __name__ == "__main__":
    sys.exit(main())
