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
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

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


# Exported by `accelerate launch` to what it starts (its simple and torchrun launchers alike),
# however the launcher itself was started; nobody sets it by hand
LAUNCHER_MARKER = "ACCELERATE_DYNAMO_MODE"
LAUNCH_ENTRIES = ("accelerate-launch", "accelerate.commands.launch")  # run the launcher directly
CLI_ENTRIES = ("accelerate", "accelerate.commands.accelerate_cli")  # run it as their `launch` command


def _runs(arg: str, previous: str) -> str:
    """What a command-line word runs: the module after -m, accelerate's own file run by path
    (as its module), or a program's name."""
    path = Path(arg)
    if previous == "-m":
        return arg
    if path.suffix == ".py" and path.parent.parts[-2:] == ("accelerate", "commands"):
        return f"accelerate.commands.{path.stem}"
    return path.name


def _launcher_options_start(argv: Sequence[str]) -> Optional[int]:
    """Where the launcher's own options begin in a command line of `accelerate launch`, however
    it was started (the console scripts `accelerate launch` and `accelerate-launch`, `python -m
    accelerate.commands.launch`, `python -m accelerate.commands.accelerate_cli launch`, or their
    files by path); None for any other command line."""
    for i, arg in enumerate(argv):
        runs = _runs(arg, argv[i - 1] if i else "")
        if runs in LAUNCH_ENTRIES:
            return i + 1
        if runs in CLI_ENTRIES and argv[i + 1 : i + 2] == ["launch"]:
            return i + 2
    return None


def is_accelerate_launcher(argv: Sequence[str]) -> bool:
    return _launcher_options_start(argv) is not None


def _proc_argv(pid: int) -> Optional[List[str]]:
    try:
        return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:  # gone, or no /proc: not Linux
        return None


def _proc_environ(pid: int) -> Optional[Dict[str, str]]:
    """The environment a process was started with (what its own changes leave out)."""
    try:
        pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return dict(pair.decode(errors="replace").split("=", 1) for pair in pairs if b"=" in pair)


def _parent_pid(pid: int) -> int:
    try:  # /proc/PID/stat: "pid (name) state ppid ..."; the name may hold spaces and parentheses
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def accelerate_launcher_pid(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """The process id of the `accelerate launch` that started this process, or None when none
    did. Whether one did is the launcher's own word (LAUNCHER_MARKER in the environment); which
    process it is, the nearest ancestor with a launcher's command line: the parent for one
    process and for torchrun's workers alike, the grandparent of a script a script started."""
    environ = os.environ if environ is None else environ
    if LAUNCHER_MARKER not in environ:
        return None
    pid = os.getppid()
    for _ in range(8):
        argv = _proc_argv(pid) if pid > 1 else None
        if argv is None:
            return None
        if is_accelerate_launcher(argv):
            return pid
        pid = _parent_pid(pid)
    return None


def accelerate_launcher_argv() -> Optional[List[str]]:
    """The command line of the `accelerate launch` that started this process, or None when none
    did (or, not on Linux, when it cannot be read: its precision then counts as given)."""
    pid = accelerate_launcher_pid()
    return _proc_argv(pid) if pid else None


def launcher_threads(launcher_argv: Optional[Sequence[str]], launcher_environ: Optional[Mapping[str, str]],
                     environ: Mapping[str, str], cores: int, script: str) -> Optional[int]:
    """The torch threads of a process that `accelerate launch` started, where the launcher chose
    its OMP_NUM_THREADS (1, whatever the machine, unless given --cpu) and the user did not (the
    launcher's --num_cpu_threads_per_process, or an OMP_NUM_THREADS it was started with): its
    share of the `cores` it may use, among the machine's LOCAL_WORLD_SIZE processes. None where
    the user's value stands or no launcher started it."""
    if launcher_argv is None or launcher_environ is None or "OMP_NUM_THREADS" in launcher_environ:
        return None
    if any(a.startswith(("--num_cpu_threads_per_process", "--num-cpu-threads-per-process")) for a in _launcher_options(launcher_argv, script)):
        return None
    return max(1, cores // int(environ.get("LOCAL_WORLD_SIZE", "1")))


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: taskset, cgroups' cpusets, Slurm)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _launcher_options(launcher_argv: Sequence[str], script: str) -> List[str]:
    """The launcher's own options: what comes between its name and the script it starts."""
    start = _launcher_options_start(launcher_argv) or 0
    own = list(launcher_argv[start:])
    for i, arg in enumerate(own):
        if arg == script or arg.endswith(".py") or arg in ("-m", "--module"):  # the script, or the module that follows
            return own[:i]
    return own


def _launcher_chose_precision(launcher_argv: Sequence[str], script: str, default_config_exists: bool) -> bool:
    """Did the user give `accelerate launch` a precision: its flag, or a config file (named,
    or accelerate's default one)? Only the launcher's own options count, not the script's."""
    own = _launcher_options(launcher_argv, script)
    named = any(a.startswith(("--mixed_precision", "--mixed-precision", "--config_file", "--config-file")) for a in own)
    return named or (default_config_exists and "--cpu" not in own)  # --cpu: the launcher skips its default config


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
    """Per-device speed settings for training with fixed input shapes: on CPU, glibc keeping
    freed memory and, under `accelerate launch`, the cores its OMP_NUM_THREADS=1 would leave idle."""
    if device.type == "cpu":
        keep_freed_memory()
        pid = accelerate_launcher_pid()
        threads = launcher_threads(_proc_argv(pid), _proc_environ(pid), os.environ, usable_cores(), sys.argv[0]) if pid else None
        if threads:
            torch.set_num_threads(threads)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has one shape: autotune each conv once
        allow_tf32()


def allow_tf32() -> None:
    """fp32 matmuls and convolutions on tensor cores (TF32, Ampere+). Torch 2.9 moved the switches
    to `fp32_precision` (its older `allow_tf32` is deprecated there, and mixing the two raises);
    before 2.9 only `allow_tf32` exists."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
    if hasattr(torch.backends.cudnn, "conv"):
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cudnn.allow_tf32 = True


def describe(device: torch.device) -> str:
    """The training device in a few words: type, model, threads on CPU."""
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({cpu_name()}, {threads} thread{'s' if threads > 1 else ''})"
    return f"{device} ({torch.cuda.get_device_name(device)})"


def gpu_count() -> Optional[int]:
    """How many GPUs a driver may share out to its runs (CUDA_VISIBLE_DEVICES applied); None without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else None
