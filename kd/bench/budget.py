"""Time budgets from FLOP counts, for the GPU check's quick profile (scripts/gpu_check.py --quick).

A step's estimate is its FLOPs divided by a sustained rate, plus a fixed overhead for what
FLOPs do not count (a process's start and imports, CUDA's context, reading the data, cuDNN's
autotuning, evaluation and export). FLOPs per 32x32 image are counted on the CPU by torch's
FlopCounterMode (2 FLOPs per multiply-add) over one forward, and over one forward and
backward (a training step, about 3x the forward): they follow the architecture, never a
table that can drift from it. The rate is ASSUMED_TFLOPS until a step has measured one.
"""

import functools
import math
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

# Sustained bf16 FLOP/s of eager PyTorch training these CIFAR ResNets (3x3 convs of 64-256
# channels on 32x32 to 8x8 maps, batch 512) on one H100 or H200, forward and backward. Not
# measured here (no GPU was lent): a planning figure, deliberately low. The H100 SXM's dense
# bf16 peak is 989 TFLOP/s (NVIDIA's datasheet; an 8192^3 matmul ran at ~790 on this
# workplace's H200), but convolutions with 64-256 channels are short GEMMs, and BatchNorm and
# ReLU move as many bytes as the convs take time: at batch 512 one 64-channel activation is 67 MB
# of bf16, ~45 us per read+write at 3 TB/s, against ~100 us for its 3x3 conv at 400 TFLOP/s.
# so a large share of peak (25-40%) is out of reach in eager PyTorch. 40 TFLOP/s (4% of peak)
# keeps the plans on the safe side; the truth could be 2-4x higher, or lower where kernel
# launches leave the GPU idle. The throughput step measures the real rate, and the later
# steps are planned with it.
ASSUMED_TFLOPS = 40.0

# Seconds FLOPs do not cover, per step, on a GPU host (assumptions of the same standing):
OVERHEAD_S = {
    "throughput": 10,  # python + torch/timm imports ~5 s, CUDA context ~2 s, cuDNN autotuning in the warm-up
    "teacher": 45,  # the same, plus decoding the 60k JPEGs once (~20 s on one core), test evaluation, export, plots
    "distill": 30,  # the same, the data read back from the decode cache, the teacher loaded
    "bench": 90,  # kd.bench: the data, 2 DataLoader workers decoding, 11 fresh processes for figure 4
}

QUICK_LIMIT_S = 480  # the quick profile, all steps, on one H100/H200: fits a 15-minute lease with the machine's start
QUICK_BUDGETS_S = {"throughput": 60, "teacher": 120, "distill": 100, "bench": 160}  # 440 s
RESERVE_S = 20  # the script's own start, FLOP counting and summary, kept out of the steps' share


@dataclass(frozen=True)
class ModelFlops:
    forward: float  # FLOPs of one image's forward (eval mode)
    train: float  # FLOPs of one image's forward and backward (train mode)


@functools.lru_cache(maxsize=None)
def count_flops(name: str, num_classes: int = 10, image_size: int = 32) -> ModelFlops:
    """FLOPs per image of a registered model, counted on the CPU over a batch of 2 (BatchNorm
    needs more than one image in train mode)."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import kd  # noqa: F401  registers the cifar_* models in timm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes)
    images = torch.randn(2, 3, image_size, image_size)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    forward = counter.get_total_flops() / len(images)
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(images).float().sum().backward()
    return ModelFlops(forward, counter.get_total_flops() / len(images))


@dataclass
class Estimate:
    """Seconds a step should take: flops / rate + overhead."""

    flops: float
    overhead_s: float
    tflops: float  # the sustained rate used
    rate_source: str  # "assumed" or what measured it

    @property
    def compute_s(self) -> float:
        return self.flops / (self.tflops * 1e12)

    @property
    def seconds(self) -> float:
        return self.compute_s + self.overhead_s

    def to_dict(self) -> Dict:
        return {**asdict(self), "compute_s": round(self.compute_s, 2), "seconds": round(self.seconds, 1)}

    def line(self) -> str:
        return (f"{self.flops / 1e12:,.1f} TFLOP at {self.tflops:.0f} TFLOP/s ({self.rate_source}) = {self.compute_s:.1f} s"
                f" + {self.overhead_s:.0f} s overhead = {self.seconds:.0f} s")


def throughput_flops(student: ModelFlops, teacher: ModelFlops, batch_size: int, steps: int) -> float:
    """The throughput step: `steps` training steps of each of the student, the teacher, and a
    logits distillation step (the student's training step and the teacher's forward)."""
    return steps * batch_size * (student.train + teacher.train + student.train + teacher.forward)


def run_flops(train_per_image: float, eval_per_image: float, n_train: int, n_test: int, epochs: int) -> float:
    """A training run: `epochs` passes over the training split, then one test evaluation."""
    return epochs * n_train * train_per_image + n_test * eval_per_image


def bench_flops(s, student: ModelFlops, teacher: ModelFlops, n_train: int, n_modes: int) -> float:
    """kd.bench's training steps under its Settings `s` (figures 1, 3, 4 and 5; figure 2 only
    moves data, and torch.compile is left out: it runs only on what is left of kd.bench's
    --budget). Approximate: it follows kd/bench/figures.py's loops."""
    rounds = s.warmup + s.repeats
    steps = max(1, min(s.steps_per_call, n_train // s.batch_size))
    loop = rounds * steps * s.batch_size * 2 * (student.train + teacher.train)  # figure 1: ours and the bare loop, both models
    distill_step = student.train + teacher.forward
    methods = rounds * s.distill_batch_size * ((n_modes + 1) * distill_step + student.train)  # figure 3: every mode, reference, student
    memory = s.memory_steps * s.batch_size * (2 * student.train + n_modes * distill_step + teacher.train)  # figure 4
    options = rounds * s.batch_size * 4 * student.train  # figure 5: four variants of the student's bare step
    return loop + methods + memory + options


def epochs_that_fit(budget_s: float, per_epoch_flops: float, fixed_flops: float, overhead_s: float, tflops: float) -> int:
    """Whole epochs whose estimate stays within `budget_s` (0: not even one)."""
    left = budget_s - overhead_s - fixed_flops / (tflops * 1e12)
    return max(0, math.floor(left / (per_epoch_flops / (tflops * 1e12))))


@dataclass
class Bounded:
    returncode: Optional[int]  # None: stopped at its budget
    wall_s: float


def run_bounded(command: Sequence[str], timeout_s: float, log: Path, cwd: Path, env: Optional[Dict[str, str]] = None) -> Bounded:
    """Run a command, its output to `log`; at `timeout_s` kill it and every process it started
    (its own process group: kd.bench's forkserver children too)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(list(map(str, command)), stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        try:
            returncode = process.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group of the one child started above
            process.wait()
            returncode = None
    return Bounded(returncode, time.perf_counter() - start)
