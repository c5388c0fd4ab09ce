"""The precision policy with mocked hardware and launchers, and what a real run prints and records."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY_FLAGS, console_script, read_json, run_script
from kd.train import device
from kd.train.device import Hardware, Precision, choose_precision
from kd.util.text import format_duration

AVX2_CPU = Hardware("cpu", "AMD EPYC 7B13")  # Zen 3: AVX2, no AVX512-BF16
BF16_CPU = Hardware("cpu", "Intel Xeon 8480+", cpu_bf16="AMX")
H100 = Hardware("cuda", "NVIDIA H100", cuda_capability=(9, 0))
A100 = Hardware("cuda", "NVIDIA A100", cuda_capability=(8, 0))
V100 = Hardware("cuda", "Tesla V100", cuda_capability=(7, 0))
T4 = Hardware("cuda", "Tesla T4", cuda_capability=(7, 5))
P100 = Hardware("cuda", "Tesla P100", cuda_capability=(6, 0))

LAUNCHER = ["/venv/bin/python3", "/venv/bin/accelerate", "launch"]  # how `accelerate launch` shows in /proc


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def policy(hardware, flag=None, environ=None, launcher_argv=None, default_config=False, monkeypatch=None):
    warnings = []
    if monkeypatch is not None:
        monkeypatch.setattr(device, "accelerate_default_config_exists", lambda: default_config)
    chosen = choose_precision(flag, hardware, warnings.append, environ or {}, launcher_argv, script="train.py")
    return chosen, warnings


@pytest.mark.parametrize("hardware,mode", [(AVX2_CPU, "no"), (BF16_CPU, "bf16"), (H100, "bf16"), (A100, "bf16"),
                                           (V100, "fp16"), (T4, "fp16"), (P100, "no")])
def test_hardware_default_is_the_native_reduced_precision(hardware, mode):
    chosen, warnings = policy(hardware)
    assert chosen.mode == mode and chosen.reason.startswith("hardware default") and warnings == []


def test_explicit_flag_wins_over_accelerate_and_hardware():
    environ = {"ACCELERATE_MIXED_PRECISION": "bf16"}
    chosen, _ = policy(H100, flag="no", environ=environ, launcher_argv=[*LAUNCHER, "--mixed_precision", "bf16", "train.py"])
    assert chosen == Precision("no", "--mixed-precision")


def test_the_launchers_implicit_no_is_not_a_choice(monkeypatch):
    """`accelerate launch train.py` with no flag and no config exports ACCELERATE_MIXED_PRECISION=no."""
    environ = {"ACCELERATE_MIXED_PRECISION": "no"}
    implicit, _ = policy(H100, environ=environ, launcher_argv=[*LAUNCHER, "train.py", "--mixed-precision-is-a-script-flag"],
                         monkeypatch=monkeypatch)
    assert implicit.mode == "bf16" and implicit.reason.startswith("hardware default")
    # the same `no` given on purpose: the launcher's flag, a named config file, accelerate's default config
    for argv, default_config in (([*LAUNCHER, "--mixed_precision", "no", "train.py"], False),
                                 ([*LAUNCHER, "--mixed_precision=no", "train.py"], False),
                                 ([*LAUNCHER, "--config_file", "fp32.yaml", "train.py"], False),
                                 ([*LAUNCHER, "train.py"], True)):
        chosen, _ = policy(H100, environ=environ, launcher_argv=argv, default_config=default_config, monkeypatch=monkeypatch)
        assert chosen.mode == "no" and "accelerate launch" in chosen.reason, argv


def test_accelerate_variable_set_by_hand_is_a_choice():
    chosen, _ = policy(BF16_CPU, environ={"ACCELERATE_MIXED_PRECISION": "no"}, launcher_argv=None)
    assert chosen == Precision("no", "ACCELERATE_MIXED_PRECISION")


def test_emulated_bf16_runs_with_one_warning_naming_fp32():
    for hardware in (AVX2_CPU, V100):
        chosen, warnings = policy(hardware, flag="bf16")
        assert chosen.mode == "bf16" and len(warnings) == 1
        assert "emulated" in warnings[0] and "--mixed-precision no" in warnings[0] and "fp32" in warnings[0]
    assert policy(BF16_CPU, flag="bf16")[1] == [] and policy(H100, flag="bf16")[1] == []


def test_fp16_on_a_cpu_trains_in_fp32_with_one_warning():
    chosen, warnings = policy(BF16_CPU, flag="fp16")
    assert chosen.mode == "no" and len(warnings) == 1 and "fp16" in warnings[0] and "fp32" in warnings[0]
    assert policy(V100, flag="fp16") == (Precision("fp16", "--mixed-precision"), [])


def test_launcher_detection():
    commands = "/venv/lib/python3.11/site-packages/accelerate/commands"
    for argv, launched in ((LAUNCHER + ["x.py"], True), (["python", "-m", "accelerate.commands.launch", "x.py"], True),
                           (["/venv/bin/accelerate-launch", "x.py"], True), (["/usr/bin/torchrun", "--nproc_per_node", "2", "x.py"], False),
                           (["python", "-m", "accelerate.commands.accelerate_cli", "launch", "x.py"], True),
                           (["python", f"{commands}/launch.py", "x.py"], True), (["python", f"{commands}/accelerate_cli.py", "launch", "x.py"], True),
                           (["python", "-m", "accelerate.commands.accelerate_cli", "env"], False),
                           (["python", "launch.py"], False), (["bash"], False)):
        assert device.is_accelerate_launcher(argv) == launched, argv


def test_the_launchers_own_options_are_read_however_it_was_started(monkeypatch):
    environ = {"ACCELERATE_MIXED_PRECISION": "no"}
    for start in (["python", "-m", "accelerate.commands.accelerate_cli", "launch"], ["python", "-m", "accelerate.commands.launch"],
                  ["/venv/bin/accelerate-launch"], LAUNCHER):
        implicit, _ = policy(H100, environ=environ, launcher_argv=[*start, "train.py"], monkeypatch=monkeypatch)
        assert implicit.mode == "bf16", start
        chosen, _ = policy(H100, environ=environ, launcher_argv=[*start, "--mixed_precision", "no", "train.py"], monkeypatch=monkeypatch)
        assert chosen.mode == "no", start
    # `-m MODULE`: what follows the module is the script's, not the launcher's
    script_flag, _ = policy(H100, environ=environ, launcher_argv=[*LAUNCHER, "-m", "kd.tune", "--mixed_precision", "no"], monkeypatch=monkeypatch)
    assert script_flag.mode == "bf16"
    # --cpu: the launcher skips accelerate's default config, so its `no` is nobody's choice
    cpu, _ = policy(BF16_CPU, environ=environ, launcher_argv=[*LAUNCHER, "--cpu", "train.py"], default_config=True, monkeypatch=monkeypatch)
    assert cpu.mode == "bf16"


def test_threads_where_the_launcher_chose_them():
    """accelerate launch exports OMP_NUM_THREADS=1: where the user gave neither that variable nor
    --num_cpu_threads_per_process, each local process gets its share of the usable cores."""
    threads = lambda argv, launcher_environ, environ={}: device.launcher_threads(argv, launcher_environ, environ, 16, "train.py")  # noqa: E731
    assert threads([*LAUNCHER, "train.py"], {}) == 16
    assert threads([*LAUNCHER, "--multi_gpu", "--num_processes", "4", "train.py"], {}, {"LOCAL_WORLD_SIZE": "4"}) == 4
    assert threads([*LAUNCHER, "train.py"], {}, {"LOCAL_WORLD_SIZE": "32"}) == 1
    assert threads([*LAUNCHER, "train.py"], {"OMP_NUM_THREADS": "1"}) is None  # the user's own 1
    assert threads([*LAUNCHER, "--num_cpu_threads_per_process", "3", "train.py"], {}) is None
    assert threads([*LAUNCHER, "train.py", "--num_cpu_threads_per_process", "3"], {}) == 16  # the script's flag, not the launcher's
    assert threads(None, None) is None  # no launcher


PROBE = """
import torch
from kd.train import device
device.tune_for(torch.device("cpu"))
h100 = device.Hardware("cuda", "NVIDIA H100", cuda_capability=(9, 0))
print("probe:", device.choose_precision(None, h100, warn=lambda line: None).mode, torch.get_num_threads(), device.describe(torch.device("cpu")))
"""


def _launch_probe(launcher, launcher_args, tmp_path, env=None):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    environment = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_MIXED_PRECISION", "OMP_NUM_THREADS", "ACCELERATE_DYNAMO_MODE")}
    environment.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"), **(env or {}))  # no accelerate default config there
    result = subprocess.run([*launcher, *launcher_args, "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no", str(probe)],
                            capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("probe: ")]
    mode, threads, described = line.split(" ", 3)[1:]
    return mode, int(threads), described


@pytest.mark.parametrize("launcher", ["accelerate launch", "accelerate-launch", "python -m accelerate.commands.launch",
                                      "python -m accelerate.commands.accelerate_cli launch"])
def test_every_way_of_starting_the_launcher_is_recognised(launcher, tmp_path):
    """Through the real launcher: its implicit `no` is nobody's choice (an H100 would train in
    bf16), and its OMP_NUM_THREADS=1 gives way to the cores this process may use."""
    command = {"accelerate launch": [console_script("accelerate"), "launch"], "accelerate-launch": [console_script("accelerate-launch")],
               "python -m accelerate.commands.launch": [sys.executable, "-m", "accelerate.commands.launch"],
               "python -m accelerate.commands.accelerate_cli launch": [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]}[launcher]
    mode, threads, described = _launch_probe(command, [], tmp_path)
    cores = usable_cores()
    assert mode == "bf16" and threads == cores and f"{cores} thread" in described


def test_what_the_user_gave_the_launcher_stands(tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
    mode, threads, _ = _launch_probe(command, ["--mixed_precision", "no"], tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert (mode, threads) == ("no", 1)
    _, threads, _ = _launch_probe(command, ["--num_cpu_threads_per_process", "1"], tmp_path)
    assert threads == 1


def test_this_machine_is_classified_as_torch_reports_it(monkeypatch):
    import torch

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    hardware = device.detect_hardware(use_cpu=True)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert device.native_bf16(hardware) == native
    assert device.hardware_default(hardware).mode == ("bf16" if native else "no")


def test_a_onednn_cap_below_bf16_means_emulated(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN emulate bf16 even where the CPU has it."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert device.cpu_native_bf16() is None
    assert device.hardware_default(device.detect_hardware(use_cpu=True)).mode == "no"


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 59, 61, 3599, 3600, 7384)] == ["0s", "59s", "1m01s", "59m59s", "1h00m", "2h03m"]


def _launch_single(script_args, launcher_args, env, timeout=300):
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--num_processes", "1", str(REPO / "train_student.py"),
               *map(str, script_args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def test_accelerate_launch_without_a_precision_uses_the_hardware_default(tiny_dataset, tmp_path):
    """The README's command: no accelerate config, no flag. The run must not fall back to the
    launcher's implicit fp32; `--mixed_precision no` given to the launcher is obeyed."""
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_MIXED_PRECISION", "OMP_NUM_THREADS")}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"))  # no accelerate default config there
    expected = device.hardware_default(device.detect_hardware(use_cpu=True))
    flags = ["--dataset", tiny_dataset, *TINY_FLAGS, "--epochs", "1", "--model", "cifar_resnet8"]
    implicit = _launch_single([*flags, "--output-dir", tmp_path / "implicit"], [], env)
    assert implicit.returncode == 0, implicit.stderr[-3000:]
    config = read_json(tmp_path / "implicit" / "run_config.json")
    assert config["mixed_precision"] == expected.mode and config["precision_reason"] == expected.reason
    start = [line for line in implicit.stdout.splitlines() if line.startswith("start: ")]
    assert len(start) == 1 and f"precision {expected.label} ({expected.reason})" in start[0], implicit.stdout
    # the launcher's OMP_NUM_THREADS=1 (the user gave none) gives way to the cores this process may use
    assert re.search(rf", {usable_cores()} threads?\) \|", start[0]), start[0]
    explicit = _launch_single([*flags, "--output-dir", tmp_path / "explicit"], ["--mixed_precision", "no"], env)
    assert explicit.returncode == 0, explicit.stderr[-3000:]
    config = read_json(tmp_path / "explicit" / "run_config.json")
    assert config["mixed_precision"] == "no" and "accelerate launch" in config["precision_reason"]


def test_start_line_and_time_left(tiny_dataset, tmp_path):
    """One start-up line (device, processes, precision and why, batches, steps); every epoch but
    the last says how long the rest of the run will take."""
    result = run_script("train_student.py", "--dataset", tiny_dataset, "--output-dir", tmp_path / "run", *TINY_FLAGS,
                        "--epochs", "3", "--grad-accum", "2", "--model", "cifar_resnet8")
    start = [line for line in result.stdout.splitlines() if line.startswith("start: ")]
    assert len(start) == 1, result.stdout
    # 160 training images (192 - 32 validation) / 32 per step = 5 steps of 2 micro-batches of 16
    assert re.fullmatch(r"start: cpu \(.+, \d+ threads?\) \| 1 process \| precision fp32 \(ACCELERATE_MIXED_PRECISION\) \| "
                        r"batch 32 global, 16 per process x 2 accumulation steps \| 5 steps per epoch, 3 epochs", start[0]), start[0]
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 3
    assert all(re.search(r" \| (\d+m)?\d+s left$", line) for line in epochs[:2]) and "left" not in epochs[2], epochs


def test_fp16_on_cpu_warns_once_and_trains_in_fp32(tiny_dataset, tmp_path):
    result = run_script("train_student.py", "--dataset", tiny_dataset, "--output-dir", tmp_path / "run", *TINY_FLAGS,
                        "--epochs", "1", "--model", "cifar_resnet8", "--mixed-precision", "fp16")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "fp16" in warnings[0] and "Traceback" not in result.stderr, result.stderr
    assert read_json(tmp_path / "run" / "run_config.json")["mixed_precision"] == "no"


def test_tune_for_cuda_turns_on_autotuning_and_tf32_without_a_gpu():
    """tune_for only sets flags, so it runs on any machine, at any torch setup.cfg allows: torch
    2.9 moved the TF32 switches to `fp32_precision`, torch before it has only `allow_tf32` (the
    floors job, .ci/floors, runs this at the oldest torch)."""
    import torch

    if hasattr(torch.backends.cudnn, "conv"):
        tf32 = [(torch.backends.cuda.matmul, "fp32_precision", "ieee", "tf32"),
                (torch.backends.cudnn.conv, "fp32_precision", "ieee", "tf32")]
    else:
        tf32 = [(torch.backends.cuda.matmul, "allow_tf32", False, True), (torch.backends.cudnn, "allow_tf32", False, True)]
    switches = [*tf32, (torch.backends.cudnn, "benchmark", False, True)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, *_ in switches]  # not monkeypatch: these objects define __setattr__
    try:
        for owner, name, off, _ in switches:
            setattr(owner, name, off)
        device.tune_for(torch.device("cuda"))
        assert [getattr(owner, name) for owner, name, *_ in switches] == [on for *_, on in switches]
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
