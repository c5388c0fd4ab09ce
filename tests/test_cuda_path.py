"""What a GPU run does that no CPU run shows by its results, checked on CPU where it can be."""

from conftest import REPO, run_script

PREPARED = """
import sys
from pathlib import Path
import timm
from kd.train import device, runner
from kd.config import RunArgs, TrainConfig
from kd.distillers import Supervised
accelerator = runner.make_accelerator(TrainConfig(batch_size=4), RunArgs(output_dir=sys.argv[1], report_to="none"), None,
                                      device.Precision("no", "test"))
model = accelerator.prepare(Supervised(timm.create_model("cifar_resnet8", num_classes=2)))
Path(sys.argv[1], f"rank{accelerator.process_index}.txt").write_text(f"{type(model).__name__} {model.broadcast_buffers}")
"""


def test_ddp_broadcasts_no_buffers_before_each_forward(tmp_path):
    """DDP's default broadcasts every BatchNorm buffer from rank 0 before every forward (one
    collective per step); engine.evaluate syncs them before evaluation and saving instead."""
    script = tmp_path / "prepared.py"
    script.write_text(PREPARED)
    run_script(str(script), tmp_path, processes=2)  # each process writes what it prepared (their prints would interleave)
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["DistributedDataParallel False"] * 2


def test_the_multi_gpu_config_claims_only_what_holds():
    """N processes train like 1 process with --grad-accum N (tests/test_ddp.py measures it), not
    like 1 process with the same flags: BatchNorm sees 1/N of the global batch in each."""
    text = (REPO / "accelerate_configs" / "multi_gpu.yaml").read_text()
    comments = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "matches 1 GPU with --grad-accum N" in comments and "--sync-bn" in comments, comments
    assert "match a 1-GPU run with the same flags" not in comments
