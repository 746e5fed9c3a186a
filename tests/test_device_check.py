"""The prepared device check: its report says what ran, what failed and why; with --dry it runs end to end on a CPU
and writes every figure."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks.device_report import BENCHMARKS
from benchmarks.device_report import main as report

REPO = Path(__file__).resolve().parents[1]
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="4"><testcase classname="tests.test_flex_attention" name="test_fused"><failure message="x"/>
</testcase><testcase classname="t" name="a"/><testcase classname="t" name="b"/><testcase classname="t" name="c">
<skipped/></testcase></testsuite></testsuites>"""


def test_report_records_failures_timeouts_and_figures(tmp_path):
    (tmp_path / "tests.xml").write_text(JUNIT)
    (tmp_path / "gpu_attention.json").write_text(json.dumps({"flex_over_sdpa": 0.6}))
    (tmp_path / "gpu_streaming.json").write_text(json.dumps({"stale": True}))  # left by an earlier run
    (tmp_path / "device_check.log").write_text("== gpu_train_step\nTraceback: CUDA out of memory\n")
    got = report([str(tmp_path), "--timings", "tests=30:1", "gpu_attention=12:0", "gpu_train_step=150:124",
                  "gpu_extractors=40:1", "gpu_streaming=60:137"])
    assert got["tests"] == {"ran": True, "tests": 4, "failures": 1, "errors": 0, "skipped": 1, "passed": 2,
                            "failed": ["tests.test_flex_attention::test_fused"]}
    assert got["benchmarks"]["gpu_attention"] == {"flex_over_sdpa": 0.6}
    assert got["benchmarks"]["gpu_train_step"]["error"] == "timed out"
    assert "CUDA out of memory" in got["benchmarks"]["gpu_train_step"]["log_tail"]
    assert got["benchmarks"]["gpu_extractors"]["error"] == "exit status 1"
    assert got["benchmarks"]["gpu_streaming"]["error"] == "timed out"  # its old file is not taken for figures
    assert got["complete"] is False
    assert json.loads((tmp_path / "device_check.json").read_text()) == got


@pytest.mark.slow
def test_dry_run_writes_every_figure(tmp_path):
    """About 90 s on 2 cores: the whole script at tiny sizes with this repo's .venv."""
    run = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh"), "--dry", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert run.returncode == 0, run.stdout + run.stderr
    got = json.loads((tmp_path / "device_check.json").read_text())
    assert got["complete"] and got["mode"] == "dry" and got["tests"]["passed"] > 20
    bench = got["benchmarks"]
    assert set(bench) == set(BENCHMARKS)
    assert bench["gpu_attention"]["max_abs_difference"] < 1e-5
    assert bench["gpu_train_step"]["paths"]["sdpa"]["step_s"] > 0 and bench["gpu_train_step"]["zero_stage"] == 2
    assert all(bench["gpu_extractors"][k]["step_over_bare"] > 0 for k in ("motion", "hubert", "wan_vae"))
    streaming = bench["gpu_streaming"]["streaming"]
    assert streaming["cache_bytes_at_end"] == streaming["cache_bytes_full_window"]  # flat over the stream
