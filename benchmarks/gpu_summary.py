"""The one summary table of ``benchmarks/gpu_check.sh``: each CUDA target with its measured value and PASS/FAIL.

Reads the JSON that ``bench_engine.py`` and ``bench_anchors.py`` wrote, the test log and the step exit statuses from
the log folder. Exits non-zero if a step crashed, or (on CUDA) if a target fails; a dry run on CPU only reports.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ANCHOR_SPEEDUP_TARGET = 10.0  # batched explain vs the per-image anchor practice at B = 32, on CUDA
MATCHED = {"rollout": "rollout", "grad_rollout": "grad_rollout", "generic_rule": "grad_rollout"}


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", type=Path)
    parser.add_argument("--dry-run", type=int, default=0)
    args = parser.parse_args()
    statuses = dict(line.split() for line in (args.logs / "status.txt").read_text().splitlines() if line.strip())
    rows: list[tuple[str, str, str, bool | None]] = []  # (measure, target, measured, met or None for information)

    engine = load(args.logs / "bench_engine.json")
    for case in engine or []:
        for ratio in case["ratios"]:
            value, target, relation = ratio["value"], ratio["target"], ratio["relation"]
            met = value <= target if relation == "<=" else value >= target
            label = f"bench_engine {case['size']}px B={case['batch']}: {ratio['label']}"
            rows.append((label, f"{relation} {target}", f"{value:.2f}", met))

    anchors = load(args.logs / "bench_anchors.json")
    if anchors:
        largest = max(case["batch"] for case in anchors["cases"])
        for case in anchors["cases"]:
            times, peaks, label = case["times"], case["peaks"], f"B={case['batch']} {case['size']}px"
            names = [n.removeprefix("anchor_") for n in times if n.startswith("anchor_")]
            speedups = [times[f"anchor_{name}"] / times[f"explain_{MATCHED[name]}"] for name in names]
            applies = case["batch"] == largest
            rows.append(
                (
                    f"anchors {label}: per-image {'/'.join(names)} / batched",
                    f">= {ANCHOR_SPEEDUP_TARGET:g}" if applies else "info",
                    " ".join(f"{value:.1f}x" for value in speedups),
                    min(speedups) >= ANCHOR_SPEEDUP_TARGET if applies else None,
                )
            )
            gmar = times["explain_gmar_l1"]
            ratios = (gmar / times["floor"], gmar / times["train_step"], peaks["explain_gmar_l1"] / peaks["train_step"])
            measured = "{:.2f} {:.2f} {:.2f}".format(*ratios)
            rows.append((f"anchors {label}: gmar_l1 / floor, / step, peak / step", "info", measured, None))

    failures: list[str] = []
    for name, label in (("tests_engine", "engine tests on the device"), ("tests_rest", "rest of the test suite")):
        log = args.logs / f"{name}.log"
        if not log.exists():
            continue
        text = log.read_text(errors="replace")
        # Only pytest's closing line ("== 3 failed, 640 passed in 97.1s ==", no "=" under -q): test names may hold
        # numbers.
        closing = re.findall(r"^=*\s*(\d+ [a-z]+\b.* in [\d.]+s\b.*)$", text, flags=re.MULTILINE)
        counts = re.findall(r"(\d+) (passed|failed|errors?|skipped)", closing[-1]) if closing else []
        summary = ", ".join(f"{n} {word}" for n, word in counts) or "no result (timed out?)"
        rows.append((label, "all pass", summary, statuses.get(name) == "0"))
        # -ra's short summary; a crashed pytest-xdist worker's test is listed there too.
        failures += re.findall(r"^(?:FAILED|ERROR) .*$", text, flags=re.MULTILINE)

    # A benchmark exits 1 when a target is missed; it crashed (or timed out) when it ran (--tests-only skips it) and
    # left no JSON.
    crashed = [
        name
        for name in ("bench_engine", "bench_anchors")
        if name in statuses and not (args.logs / f"{name}.json").exists()
    ]
    width = max(len(row[0]) for row in rows)
    mode = "DRY RUN on CPU: targets are for CUDA, shown for the format only" if args.dry_run else "CUDA"
    print(f"SUMMARY ({mode}; {anchors['device_name'] if anchors else 'no anchors result'})")
    print(f"{'measure':<{width}}  {'target':<8}  {'measured':<26}  result")
    for measure, target, measured, met in rows:
        result = "info" if met is None else "PASS" if met else "FAIL"
        print(f"{measure:<{width}}  {target:<8}  {measured:<26}  {result}")
    if crashed:
        print(f"steps that crashed or timed out: {', '.join(crashed)}")
    for line in failures:
        print(line[:300])
    failed = any(met is False for *_, met in rows)
    raise SystemExit(1 if crashed or (failed and not args.dry_run) else 0)


if __name__ == "__main__":
    main()
