"""Write docs/RELIABILITY.md from what `make reliability` measured: the figures the suites
kept (RELIABILITY_OUT) and pytest's JUnit XML. `python scripts/reliability_report.py FIGURES XML OUT`."""

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from steering.atomic import write_text_atomic

SUITES = {
    "test_bad_input": "Bad input (Hypothesis, every RPC, over real gRPC)",
    "test_isolation": "Failure isolation (one row fails, the others go on)",
    "test_bypass": "Allowlist bypass attempts",
    "test_faults": "Faults injected",
    "test_chat": "Tagger down, logs",
    "test_load": "Load and cancellation",
    "test_security": "Security",
    "test_tagger": "The tagger retrained from its data reproduces the checked-in model",
    "test_bench": "The bench's smoke run, end to end",
}
FIGURES = (("beside", "Valid streams beside fuzzed requests"), ("bypass", "Bypass attempts"), ("derive_kill", "kill -9 during steer derive"),
           ("validate_kill", "kill -9 during steer validate"), ("damaged_vectors", "Damaged vector files"),
           ("generator_killed", "Generator killed mid-stream"), ("load", "Load"), ("cancellation", "Cancellation"))


def _cases(xml_path: str) -> dict[str, list[tuple[str, str, float]]]:
    cases: dict[str, list[tuple[str, str, float]]] = defaultdict(list)
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "FAILED"
            elif child.tag == "skipped":
                outcome = f"skipped: {child.get('message', '')}"
        cases[case.get("classname", "").split(".")[-1]].append((case.get("name", ""), outcome, float(case.get("time", 0))))
    return cases


def main(figures_path: str, xml_path: str, out: str) -> int:
    figures = json.loads(Path(figures_path).read_text()) if Path(figures_path).exists() else {}
    cases = _cases(xml_path)
    total = sum(len(v) for v in cases.values())
    failed = sum(1 for v in cases.values() for _, o, _ in v if o == "FAILED")
    lines = ["# Reliability", "", f"Written by `make reliability`: {total} tests, {failed} failed. The figures come "
             "from that run, not from hand.", ""]
    if bad := figures.get("bad_input"):
        lines += ["## Bad input", "", "| RPC | cases | answers |", "| --- | ---: | --- |"]
        for rpc, counts in bad.items():
            lines.append(f"| {rpc} | {sum(counts.values())} | " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " |")
        lines += ["", "Every stream was read to its end: a Generate or Chat stream counts as streamed only when its "
                  "last event is `finished`, and any status, before or after the first event, must be one of "
                  "INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION or RESOURCE_EXHAUSTED with a "
                  "message (never INTERNAL or UNKNOWN). \"Generate beside a valid stream\" sends each fuzzed request "
                  "while a valid happy-steered greedy stream is running; that stream must finish with exactly the "
                  "text it has alone. Afterwards both servers report SERVING and a normal request completes with no "
                  "hook left on the model.", ""]
    for key, title in FIGURES:
        if key in figures:
            lines += [f"## {title}", "", "```json", json.dumps(figures[key], indent=2), "```", ""]
    lines += ["## Every test", ""]
    for module, title in SUITES.items():
        if module in cases:
            lines += [f"### {title} (`tests/{module}.py`)", "", "| test | outcome | seconds |", "| --- | --- | ---: |"]
            lines += [f"| {name} | {outcome} | {t:.1f} |" for name, outcome, t in cases[module]]
            lines.append("")
    write_text_atomic(Path(out), "\n".join(lines))
    print(f"wrote {out}: {total} tests, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    raise SystemExit(main(*sys.argv[1:]))
