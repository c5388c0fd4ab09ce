"""The GPU check script's CPU smoke mode: every step runs and lands in one JSON summary."""

import os
import subprocess
import sys

from conftest import REPO, read_json


def test_gpu_check_smoke_runs_every_step(tiny_dataset, tmp_path):
    """Started outside the repository, with relative paths: its children run in the repository,
    and must read the same dataset and write to the same folder as the script itself."""
    out = tmp_path / "check"
    dataset = os.path.relpath(tiny_dataset, tmp_path)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), dataset, "--smoke", "--out", "check",
                             "--modes", "logits", "hybrid"], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = read_json(out / "gpu_check.json")
    assert summary["smoke"] is True and summary["bench"]["rows"], summary.get("bench")
    assert list(summary["runs"]) == ["teacher-val", "teacher", "student", "distill-logits", "distill-hybrid"]
    for name, run in summary["runs"].items():
        assert 0 <= run["test_accuracy"] <= 1 and run["epochs"] == 1 and run["median_images_per_s"] > 0, (name, run)
    # the final teacher trains on every training image: no validation split, so no validation metrics
    assert summary["runs"]["teacher"]["val_accuracy"] is None and summary["runs"]["teacher-val"]["val_accuracy"] is not None
    assert read_json(out / "teacher" / "run_config.json")["data"]["num_val"] == 0
    assert read_json(out / "distill-logits" / "run_config.json")["teacher"] == str(out / "teacher")
    assert (out / "report.md").is_file() and "gpu check: " in result.stdout
    assert not (REPO / "check").exists()  # nothing landed where the children run
