"""The precision policy with mocked hardware and launchers, and what a real run prints and records."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY_FLAGS, read_json, run_script
from kd import device
from kd.device import Hardware, Precision, choose_precision
from kd.engine import format_duration

AVX2_CPU = Hardware("cpu", "AMD EPYC 7B13")  # Zen 3: AVX2, no AVX512-BF16
BF16_CPU = Hardware("cpu", "Intel Xeon 8480+", cpu_bf16="AMX")
H100 = Hardware("cuda", "NVIDIA H100", cuda_capability=(9, 0))
A100 = Hardware("cuda", "NVIDIA A100", cuda_capability=(8, 0))
V100 = Hardware("cuda", "Tesla V100", cuda_capability=(7, 0))
T4 = Hardware("cuda", "Tesla T4", cuda_capability=(7, 5))
P100 = Hardware("cuda", "Tesla P100", cuda_capability=(6, 0))

LAUNCHER = ["/venv/bin/python3", "/venv/bin/accelerate", "launch"]  # how `accelerate launch` shows in /proc


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
    for argv, launched in ((LAUNCHER + ["x.py"], True), (["python", "-m", "accelerate.commands.launch", "x.py"], True),
                           (["/venv/bin/accelerate-launch", "x.py"], True), (["/usr/bin/torchrun", "--nproc_per_node", "2", "x.py"], False),
                           (["python", "launch.py"], False), (["bash"], False)):
        assert device.is_accelerate_launcher(argv) == launched, argv


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
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_MIXED_PRECISION"}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"))  # no accelerate default config there
    expected = device.hardware_default(device.detect_hardware(use_cpu=True))
    flags = ["--dataset", tiny_dataset, *TINY_FLAGS, "--epochs", "1", "--model", "cifar_resnet8"]
    implicit = _launch_single([*flags, "--output-dir", tmp_path / "implicit"], [], env)
    assert implicit.returncode == 0, implicit.stderr[-3000:]
    config = read_json(tmp_path / "implicit" / "run_config.json")
    assert config["mixed_precision"] == expected.mode and config["precision_reason"] == expected.reason
    start = [line for line in implicit.stdout.splitlines() if line.startswith("start: ")]
    assert len(start) == 1 and f"precision {expected.label} ({expected.reason})" in start[0], implicit.stdout
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
