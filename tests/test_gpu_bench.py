"""benchmarks/gpu.py (the GPU benchmark of issue 18) runs its own code at a tiny size on CPU, so it cannot rot:
every configuration trains through vlp.train.train and reports samples/s and MFU as one JSON line."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def test_every_configuration_runs_at_tiny_size_and_reports(tmp_path):
    out = tmp_path / "tiny.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("MASTER_PORT", None)
    # one row per code path (ZeRO-3 engine, the real loader, ALBEF + BUS); the compiled rows compile for
    # ~90 s on this CPU (benchmarks/compile.py covers train.compile); `--tiny` alone runs every row
    names = ["clip_b16_mem_z3", "clip_b16_loader", "bus_base"]
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--steps", "3", "--warmup", "1",
                           "--out", str(out), "--work", str(tmp_path / "work"), "--only", *names],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["config"] for r in records] == names
    for r in records:
        assert "error" not in r, r
        assert r["steps"] == 3 and r["samples_per_s"] > 0 and 0 < r["mfu"] < 1, r
        assert "aten::scaled_dot_product_attention" in r["attention_kernels"], r
    assert records[0]["zero_stage"] == 3 and records[0]["data"] == "in memory" and records[1]["data"] == "loader"
