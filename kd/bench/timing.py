"""What every figure shares: interleaved timing, the bare PyTorch training step used as the
baseline, peak-memory readings (process RSS on CPU, allocated GPU memory on CUDA), the
machine's description and the table's rows. One code path for both devices: a figure names
its device and precision, and only the readings below differ by device."""

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn.functional as F

import kd  # noqa: F401  registers the cifar_* models in timm
from kd.train import device as devices

STUDENT, TEACHER = "cifar_resnet8x4", "cifar_resnet14x4"


@dataclass
class Row:
    """One line of the table. `ratio` is ours / baseline (for times: lower is better)."""

    figure: str
    ours: Union[float, str]
    baseline: Union[float, str]
    unit: str
    target: str = "-"  # "-", or a comparison such as ">= 0.95" that the ratio should meet
    note: str = ""

    @property
    def ratio(self) -> Union[float, str]:
        for value in (self.ours, self.baseline):
            if isinstance(value, str):
                return value  # "failed: ..." or "skipped: ..."
        return self.ours / self.baseline if self.baseline else math.nan

    @property
    def met(self) -> Optional[bool]:
        if self.target == "-" or isinstance(self.ratio, str):
            return None
        op, value = self.target.split()
        compare = {">=": float.__ge__, "<=": float.__le__, "<": float.__lt__, ">": float.__gt__}[op]
        return compare(float(self.ratio), float(value))

    def to_dict(self) -> Dict:
        return {"figure": self.figure, "ours": self.ours, "baseline": self.baseline, "unit": self.unit,
                "ratio": self.ratio, "target": self.target, "met": self.met, "note": self.note}


def time_steps(fns: Union[Callable[[], None], Dict[str, Callable[[], None]]], warmup: int = 1, repeats: int = 3,
               device_type: str = "cpu"):
    """Median wall seconds per call. Given a dict of functions, runs them round-robin (warm-up
    rounds first, untimed), so that a slow phase of a shared machine hits every one alike. On
    CUDA the device is synchronised around each call, so that its queued work is counted."""
    named = fns if isinstance(fns, dict) else {"": fns}
    samples = {name: [] for name in named}
    sync = lambda: devices.synchronize(torch.device(device_type))  # noqa: E731
    for round_index in range(warmup + repeats):
        for name, fn in named.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    return medians if isinstance(fns, dict) else medians[""]


def bare_step(model: torch.nn.Module, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]], precision: str) -> Callable[[], None]:
    """The baseline: hand-written training steps (autocast forward, CE, backward, SGD step),
    one per pre-made batch: no data loading, no augmentation, no framework. The model and
    batches are on the device already; `precision`: "no", "bf16" or "fp16" (unscaled: a few steps only)."""
    device_type = batches[0][0].device.type
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()

    def steps() -> None:
        for images, labels in batches:
            with devices.autocast(device_type, precision):
                loss = F.cross_entropy(model(images).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return steps


def random_batch(batch_size: int, num_classes: int = 10, seed: int = 0, device_type: str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(batch_size, 3, 32, 32, generator=generator), torch.randint(0, num_classes, (batch_size,), generator=generator)
    return images.to(device_type), labels.to(device_type)


def create_model(name: str, num_classes: int = 10, seed: int = 0, device_type: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes).to(device_type)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB."""
    return _status_kb("VmHWM") / 1024


def peak_memory_mb(device_type: str) -> float:
    """The peak of what a run is limited by: process RSS on CPU, allocated GPU memory on CUDA."""
    return torch.cuda.max_memory_allocated() / 2**20 if device_type == "cuda" else peak_rss_mb()


def reset_peak_memory(device_type: str) -> bool:
    """Lower the recorded peak to the current use (Linux RSS: `echo 5 > /proc/self/clear_refs`)."""
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_name(device_type: str) -> str:
    return "GPU memory" if device_type == "cuda" else "RSS"


def machine(threads: int, hardware: devices.Hardware) -> Dict:
    cpu = f"{devices.cpu_name()} x{os.cpu_count()}"
    return {"cpu": cpu, "threads": threads, "torch": torch.__version__, "device": hardware.type, "device_name": hardware.name,
            "cpu_native_bf16": devices.cpu_native_bf16(), "python": platform.python_version()}
