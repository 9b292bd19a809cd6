"""Summarise a mutmut run: per module, mutants, checked, killed, timed out, survived, no tests, score; every survivor
by name. Reads mutmut's own result files (mutants/service/*.py.meta), so run it from the repository root after
`mutmut run` (docs/security.md):

    .venv/bin/python scripts/mutation_summary.py --command "..." --commit 252ec97 [--keep service/manifest.py]

writes benchmarks/results/mutation.json and .md. `--keep MODULE` carries a module's entry over from the results
file already there (a module not rerun this time), marked with where it came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from mutmut.stats import status_by_exit_code

MODULES = ["service/endpoints.py", "service/imaging.py", "service/manifest.py", "service/payload.py"]
MODULES += ["service/scheduler.py"]
RESULTS = Path("benchmarks/results/mutation")
CAUGHT = ("killed", "timeout")
COUNTED = ("killed", "timeout", "survived", "no tests")


def summarise(module: str, meta_dir: Path) -> dict[str, object]:
    meta = json.loads((meta_dir / f"{module}.meta").read_text())
    statuses = {name: status_by_exit_code[code] for name, code in meta["exit_code_by_key"].items()}
    counts = Counter(statuses.values())
    counted = sum(counts[s] for s in COUNTED)
    caught = sum(counts[s] for s in CAUGHT)
    other = {s: n for s, n in counts.items() if s not in (*COUNTED, "not checked")}
    entry: dict[str, object] = {
        "mutants": len(statuses),
        "killed": counts["killed"],
        "timeout": counts["timeout"],
        "survived": counts["survived"],
        "no_tests": counts["no tests"],
        "not_checked": counts["not checked"],
        "score": round(caught / counted, 4) if counted else None,
        "survivors": sorted(n for n, s in statuses.items() if s == "survived"),
        "no_tests_names": sorted(n for n, s in statuses.items() if s == "no tests"),
    }
    if other:
        entry["other"] = other  # suspicious, segfault...: neither caught nor survived, listed to be looked at
    return entry


def table(modules: dict[str, dict[str, object]]) -> list[str]:
    lines = [
        "| module | mutants | checked | killed | timeout | survived | no tests | score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for module, m in modules.items():
        checked = int(m["mutants"]) - int(m["not_checked"])  # type: ignore[call-overload]
        score = "-" if m["score"] is None else f"{100 * float(m['score']):.1f}%"  # type: ignore[arg-type]
        lines.append(
            f"| {module} | {m['mutants']} | {checked} | {m['killed']} | {m['timeout']} | {m['survived']} "
            f"| {m['no_tests']} | {score} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--command", required=True, help="the mutmut command that was run")
    parser.add_argument("--commit", required=True, help="the commit the run's working tree was at")
    parser.add_argument("--keep", action="append", default=[], help="a module carried over from the last results")
    parser.add_argument("--note", action="append", default=[], help="a line for the Markdown summary")
    parser.add_argument("--meta", type=Path, default=Path("mutants"), help="mutmut's directory")
    args = parser.parse_args()

    previous = json.loads(RESULTS.with_suffix(".json").read_text()) if args.keep else {}
    modules: dict[str, dict[str, object]] = {}
    for module in MODULES:
        if module in args.keep:
            kept = dict(previous["modules"][module])
            kept.setdefault("from", f"{previous['command']} at {previous['service_commit']}, {previous['when']}")
            modules[module] = kept
        else:
            modules[module] = summarise(module, args.meta)
    result = {
        "command": args.command,
        "service_commit": args.commit,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "notes": args.note,
        "modules": modules,
    }
    RESULTS.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")

    lines = [
        "# Mutation testing (mutmut 3.8.1)",
        "",
        f"`{args.command}` at commit {args.commit} (summarised {result['when']}), {result['machine']}.",
        "Score = (killed + timeout) / (killed + timeout + survived + no tests), of the checked mutants.",
        "Survivors and why each is left: docs/security.md.",
        "",
        *table(modules),
        "",
        *[line for note in args.note for line in (note, "")],
        "Survivors and mutants with no tests:",
        "",
    ]
    for module, m in modules.items():
        if "from" in m:
            lines.append(f"- {module}: carried over from {m['from']}")
        names = [*m.get("survivors", []), *m.get("no_tests_names", [])]  # type: ignore[list-item]
        lines += [f"- `{name}`" for name in names]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(table(modules)))


if __name__ == "__main__":
    main()
