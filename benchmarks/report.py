"""Turn a benchmark result into a Markdown table and a PNG plot."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import machine


def command_line(prog: str, argv: list[str] | None) -> str:
    """The command as it was typed, quoting the arguments a shell would need quoted (empty variants)."""
    given = sys.argv[1:] if argv is None else argv
    return " ".join([prog, *(f'"{a}"' if " " in a or not a else a for a in given)])


def provenance(command: str) -> dict[str, Any]:
    """What every result file starts with: the command that made it, when, and on which machine."""
    return {
        "command": command,
        "created_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "machine": machine.describe(),
    }


def _fmt(value: Any, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value}{suffix}"


def _engine_table(title: str, runs: list[dict[str, Any]]) -> list[str]:
    lines = ["", title, "", "| mode | img/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    return lines + [f"| {r['mode']} | {r['images_per_s']} | {r['p50']} | {r['p99']} |" for r in runs]


def markdown(result: dict[str, Any]) -> list[str]:
    m, p = result["machine"], result["profile"]
    best = result["engine"]["best"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores "
        f"available, {m['memory_gb']} GB, Python {m['python']}.",
        f"Load: headless Locust, {p['users']} users (closed loop, no think time), {p['duration_s']} s after a "
        f"{p['warmup_s']} s uncounted warm-up; {result['images']['count']} distinct JPEGs from "
        f"{result['images']['sizes'][0]} to {result['images']['sizes'][-1]}, multipart field `image`. "
        "Locust runs on the same 2 cores as the server.",
        "",
        "| system | users | answered/s | p50 ms | p95 ms | p99 ms | p99/p50 | errors | cold start s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| engine ceiling (onnxruntime alone, {best['mode']}) | | {best['images_per_s']} img/s | {best['p50']} | "
        f"{best['p95']} | {best['p99']} | | | | |",
    ]
    for s in result["systems"]:
        errors = ", ".join(f"{n} x {k}" for k, n in sorted(s["errors_by_status"].items())) or "0"
        lines.append(
            f"| {s['system']} | {s['users']} | {s['ok_per_s']} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | "
            f"{s['p99_ms']:.0f} | {_fmt(s['p99_over_p50'])} | {errors} | {s['cold_start_s']} | {s['rss']['peak_mb']} |"
        )
    lines += _engine_table("Engine runs (no HTTP, no decoding):", result["engine"]["runs"])
    if result["engine"].get("decoding_runs"):
        title = "Engine runs that first decode and resize each JPEG with the service's code (no HTTP):"
        lines += _engine_table(title, result["engine"]["decoding_runs"])
    bracketed = [s for s in result["systems"] if s.get("ceiling_next_to_it")]
    if bracketed:
        lines += [
            "",
            "The engine ceiling measured again right before and right after a system's load phase (same mode as "
            "the best one above, the server up but idle):",
            "",
            "| system | ceiling before img/s | ceiling after img/s | mean | system answered/s | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for s in bracketed:
            c = s["ceiling_next_to_it"]
            ratio = round(s["ok_per_s"] / c["mean"], 3) if c["mean"] else "n/a"
            lines.append(f"| {s['system']} | {c['before']} | {c['after']} | {c['mean']} | {s['ok_per_s']} | {ratio} |")
        windows = [s for s in bracketed if s.get("window")]
        if windows:
            lines += [
                "",
                "Steady-state window of the same load phase (answers counted by the service's /metrics), and CPU "
                "milliseconds per answered request by thread (and the Locust process):",
                "",
                "| system | window s | answered/s | inference | decode | event loop | Locust | machine idle |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for s in windows:
                w, c = s["window"], s["window"]["cpu_ms_per_request"]
                lines.append(
                    f"| {s['system']} | {w['seconds']} | {w['answered_per_s']} | {c.get('inference')} | "
                    f"{c.get('decode')} | {c.get('event loop')} | {c.get('load generator')} | {w['machine_idle']:.1%} |"
                )
    if result.get("footprint"):
        f = result["footprint"]
        lines += [
            "",
            f"Installed size of a fresh venv: serve {f['serve_venv_mb']} MB, export {f['export_venv_mb']} MB.",
        ]
    lines += ["", "Ratios:", "", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in result["ratios"].items()]
    return lines


def save(out: Path, name: str, result: dict[str, Any], lines: list[str]) -> None:
    """Write out/<name>.json and out/<name>.md (the table), and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = result["systems"]
    names = [s["system"] for s in systems]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    throughput = [s["ok_per_s"] for s in systems]
    left.barh(names, throughput, color="tab:blue")
    ceiling = result["engine"]["best"]["images_per_s"]
    left.axvline(ceiling, color="tab:red", linestyle="--", label=f"engine ceiling {ceiling} img/s")
    left.set_xlabel("answered requests/s (higher is better)")
    left.legend(loc="lower right")
    left.invert_yaxis()
    width = 0.27
    for i, (key, label) in enumerate((("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))):
        right.barh([y + (i - 1) * width for y in range(len(systems))], [s[key] for s in systems], width, label=label)
    right.set_yticks(range(len(systems)), names)
    right.set_xscale("log")
    right.set_xlabel("latency ms, log scale (lower is better)")
    right.legend(loc="lower right")
    right.invert_yaxis()
    fig.suptitle(f"{result['command']}: {result['profile']['users']} concurrent clients, {result['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
