"""The benchmark script runs end to end on a tiny model (a smoke test: no time assertions)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runs_on_a_tiny_model(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--cfg",
         str(ROOT / "cfg" / "yolov3-tiny.cfg"), "--size", "96", "--runs", "2", "--warmup", "1",
         "--batch", "2", "--json", str(out), "--markdown", str(md)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    text = json.dumps(results)
    assert "darknetpy-eager" in text and "darknetpy-opt-fp32" in text
    assert md.read_text().count("|") > 10
