"""./launch.sh gpu-check runs its four steps on CPU at tiny shapes (as it will on
the first GPU, without a venv: it must not set one up) and writes its two files."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_on_cpu(tmp_path):
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent), "OMP_NUM_THREADS": "1"}
    stale = tmp_path / "train" / "runs" / "gpu_check" / "from_an_earlier_call"
    stale.parent.mkdir(parents=True)
    stale.write_text("a rerun must train afresh, never resume and report an earlier call's figures")
    proc = subprocess.run([str(REPO / "launch.sh"), "gpu-check", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == []
    assert len(report["exactness"]) == 3
    for name, row in report["exactness"].items():
        assert row["fp32_ok"] and row["bf16_ok"] and row["bound_ok"], (name, row)
    assert [r["model"] for r in report["suite"]] == ["vit_tiny"]
    assert report["suite"][0]["methods"]["engine"]["added_syncs_per_micro_batch"] == 0
    assert report["largest_micro_batch"]["largest_micro_batch"] == 32  # the CPU cap: nothing runs out
    assert report["train"]["returncode"] == 0 and "trained 2/2 steps" in report["train"]["summary"]
    assert not stale.exists()
    assert report["train"]["train/examples_per_s"] > 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## 1. exactness" in text and "| engine |" in text and "default_gpu" in text
