"""Device decisions in one place: the precision a run trains in (and why), and the speed
settings each device wants (glibc's allocator on CPU; cuDNN autotuning and TF32 on CUDA).
The runner and the benchmark both ask here, so they never disagree.

Precision precedence: an explicit `--mixed-precision`; then a value the user gave
`accelerate launch` (its flag, a config file, or ACCELERATE_MIXED_PRECISION set by hand);
last, the hardware default: bf16 where the device computes it natively, fp16 with loss scaling
on CUDA cards that have fp16 tensor cores but no bf16 ones, fp32 everywhere else."""

import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # accelerate's names; "no" is fp32
DETECT = object()  # choose_precision's default for launcher_argv: read this process's parent


@dataclass(frozen=True)
class Hardware:
    """What the precision policy needs to know about the training device."""

    type: str  # "cuda" or "cpu"
    name: str  # the GPU's or the CPU's model name
    cuda_capability: Optional[Tuple[int, int]] = None  # (major, minor) on CUDA
    cpu_bf16: Optional[str] = None  # the CPU's native bf16 instructions ("AMX", "AVX512-BF16"), None where bf16 is emulated


@dataclass(frozen=True)
class Precision:
    mode: str  # "no" (fp32), "bf16" or "fp16": what accelerate is given
    reason: str  # why, in words, for the start-up line and run_config.json

    @property
    def label(self) -> str:
        return "fp32" if self.mode == "no" else self.mode


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


# oneDNN instruction-set caps below AVX512_CORE_BF16: with one of these in ONEDNN_MAX_CPU_ISA,
# oneDNN emulates bf16 even on a CPU that has it (measured: 11x slower than fp32, as on AVX2)
ISA_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_native_bf16() -> Optional[str]:
    """The CPU's native bf16 instructions as torch detects them, or None (bf16 emulated, ~10x
    slower than fp32 on an AVX2-only CPU, or oneDNN capped below them)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap in ISA_CAPS_WITHOUT_BF16:
        return None
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None


def detect_hardware(use_cpu: Optional[bool] = None) -> Hardware:
    """The device a run will train on: CUDA when available (unless accelerate was told to use
    the CPU: ACCELERATE_USE_CPU or `use_cpu`), else the CPU."""
    if use_cpu is None:
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if torch.cuda.is_available() and not use_cpu:
        return Hardware("cuda", torch.cuda.get_device_name(), cuda_capability=torch.cuda.get_device_capability())
    return Hardware("cpu", cpu_name(), cpu_bf16=cpu_native_bf16())


def native_bf16(hardware: Hardware) -> bool:
    """torch.cuda.is_bf16_supported() also counts emulation; bf16 tensor cores start with Ampere (8.0)."""
    if hardware.type == "cuda":
        return hardware.cuda_capability >= (8, 0)
    return hardware.cpu_bf16 is not None


def hardware_default(hardware: Hardware) -> Precision:
    if hardware.type == "cuda":
        capability = ".".join(map(str, hardware.cuda_capability))
        if native_bf16(hardware):
            return Precision("bf16", f"hardware default: compute capability {capability} has bf16 tensor cores")
        if hardware.cuda_capability >= (7, 0):  # Volta/Turing: fp16 tensor cores; accelerate scales the loss
            return Precision("fp16", f"hardware default: compute capability {capability} has fp16 but no bf16 tensor cores")
        return Precision("no", f"hardware default: compute capability {capability} has no fast reduced precision")
    if native_bf16(hardware):
        return Precision("bf16", f"hardware default: the CPU has native bf16 ({hardware.cpu_bf16})")
    return Precision("no", "hardware default: no native bf16 on this CPU (no AVX512-BF16 or AMX, or oneDNN capped below them), so bf16 would be emulated")


def is_accelerate_launcher(argv: Sequence[str]) -> bool:
    if "accelerate.commands.launch" in argv or any(a.endswith("accelerate-launch") for a in argv):
        return True
    return "launch" in argv and any(Path(a).name == "accelerate" for a in argv[: argv.index("launch")])


def accelerate_launcher_argv() -> Optional[List[str]]:
    """The command line of the `accelerate launch` that started this process (it is the parent
    for one process and for torchrun's workers alike), or None when something else started it."""
    try:
        argv = [a.decode() for a in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:  # no /proc: not Linux
        return None
    return argv if is_accelerate_launcher(argv) else None


def _launcher_chose_precision(launcher_argv: Sequence[str], script: str, default_config_exists: bool) -> bool:
    """Did the user give `accelerate launch` a precision: its flag, or a config file (named,
    or accelerate's default one)? Only the launcher's own options count, not the script's."""
    own = list(launcher_argv)
    for i, arg in enumerate(own):
        if arg == script or (arg.endswith(".py") and i > 0):
            own = own[:i]
            break
    named = any(a.startswith(("--mixed_precision", "--mixed-precision", "--config_file", "--config-file")) for a in own)
    return named or default_config_exists


def accelerate_default_config_exists() -> bool:
    from accelerate.commands.config.config_args import default_config_file

    return Path(default_config_file).is_file()


def requested_precision(flag: Optional[str], environ: Mapping[str, str], launcher_argv: Optional[Sequence[str]],
                        script: str, default_config_exists: bool) -> Optional[Precision]:
    """What the user asked for, or None. `accelerate launch` with neither a flag nor a config
    exports ACCELERATE_MIXED_PRECISION=no on its own: that `no` is nobody's choice."""
    if flag:
        return Precision(flag, "--mixed-precision")
    configured = environ.get("ACCELERATE_MIXED_PRECISION")
    if not configured:
        return None
    if launcher_argv is None:
        return Precision(configured, "ACCELERATE_MIXED_PRECISION")
    if _launcher_chose_precision(launcher_argv, script, default_config_exists):
        return Precision(configured, "accelerate launch's --mixed_precision or config file")
    return None


def check_supported(precision: Precision, hardware: Hardware, warn: Callable[[str], None]) -> Precision:
    """A user's choice runs as asked where the device can do it, with one warning line where it
    will be slow; fp16 on a CPU (accelerate leaves it unscaled and uncast there) runs as fp32."""
    if precision.mode == "fp16" and hardware.type == "cpu":
        warn("warning: fp16 mixed precision needs a GPU; training in fp32 on the CPU (use --mixed-precision bf16 on a CPU with native bf16)")
        return Precision("no", f"{precision.reason} asked for fp16, which the CPU cannot run: fp32")
    if precision.mode == "bf16" and not native_bf16(hardware):
        warn(f"warning: bf16 is emulated on this {hardware.type.upper()} ({hardware.name}) and will be slow "
             "(up to 10x slower than fp32 on CPUs without AVX512-BF16/AMX); --mixed-precision no trains in fp32")
    return precision


def choose_precision(flag: Optional[str] = None, hardware: Optional[Hardware] = None, warn: Callable[[str], None] = print,
                     environ: Optional[Mapping[str, str]] = None, launcher_argv=DETECT,
                     script: Optional[str] = None) -> Precision:
    """The precision policy (see the module's docstring). Everything it reads can be passed in,
    so that tests can mock the hardware and the launcher; by default it reads this process's."""
    hardware = hardware or detect_hardware()
    environ = os.environ if environ is None else environ
    launcher_argv = accelerate_launcher_argv() if launcher_argv is DETECT else launcher_argv
    script = sys.argv[0] if script is None else script
    default_config = accelerate_default_config_exists() if launcher_argv else False
    requested = requested_precision(flag, environ, launcher_argv, script, default_config)
    return check_supported(requested, hardware, warn) if requested else hardware_default(hardware)


def autocast(device_type: str, mode: str):
    """The autocast context of a precision mode ("no": none)."""
    if mode == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[mode])


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no mmap for big blocks, no trimming), so that a
    CPU training step stops page-faulting its activations in afresh every step: 1.5x faster
    on the benchmark's CPU for ~200 MiB more peak RSS. Linux/glibc only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def tune_for(device: torch.device) -> None:
    """Per-device speed settings for training with fixed input shapes."""
    if device.type == "cpu":
        keep_freed_memory()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has one shape: autotune each conv once
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # fp32 runs use tensor cores (Ampere+)
        torch.backends.cudnn.conv.fp32_precision = "tf32"


def describe(device: torch.device) -> str:
    """The training device in a few words: type, model, threads on CPU."""
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({cpu_name()}, {threads} thread{'s' if threads > 1 else ''})"
    return f"{device} ({torch.cuda.get_device_name(device)})"


def gpu_count() -> Optional[int]:
    """How many GPUs a driver may share out to its runs (CUDA_VISIBLE_DEVICES applied); None without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else None
