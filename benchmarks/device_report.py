"""Merge what scripts/device_check.sh wrote into one JSON: the gpu tests' outcome (JUnit XML) and each gpu_*
benchmark's figures, or why a part has none (timed out, failed: its exit status and the end of its log).

    python -m benchmarks.device_report OUT_DIR [--timings name=seconds:status ...]
"""
from __future__ import annotations

import argparse
import json
import platform
import xml.etree.ElementTree as ET
from pathlib import Path

BENCHMARKS = ("gpu_attention", "gpu_train_step", "gpu_extractors", "gpu_streaming")


def tests_summary(xml_path: Path) -> dict:
    if not xml_path.is_file():
        return {"ran": False}
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"ran": True, **counts, "failed": failed}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir")
    p.add_argument("--timings", nargs="*", default=[], help="part=seconds:exit_status, as the script measured them")
    p.add_argument("--mode", default="device")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    parts = {}
    for item in args.timings:
        name, _, rest = item.partition("=")
        seconds, _, status = rest.partition(":")
        parts[name] = {"seconds": float(seconds), "exit": int(status)}
    log = out / "device_check.log"
    log_tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
    report = {"mode": args.mode, "host": platform.node(), "tests": tests_summary(out / "tests.xml"),
              "parts": parts, "benchmarks": {}}
    for name in BENCHMARKS:
        figures = out / f"{name}.json"
        status = parts.get(name, {}).get("exit")
        if figures.is_file() and status == 0:
            report["benchmarks"][name] = json.loads(figures.read_text())
        else:
            why = "timed out" if status in (124, 137) else f"exit status {status}" if status is not None else "not run"
            report["benchmarks"][name] = {"error": why, "log_tail": log_tail}
    complete = report["tests"].get("ran") and not report["tests"].get("failed") and all(
        "error" not in v for v in report["benchmarks"].values())
    report["complete"] = bool(complete)
    text = json.dumps(report, indent=2)
    tmp = out / ".device_check.json.tmp"
    tmp.write_text(text + "\n")
    tmp.replace(out / "device_check.json")
    print(text)
    return report


if __name__ == "__main__":
    raise SystemExit(0 if main()["complete"] else 1)
