"""Every installed console script (setup.cfg [options.entry_points]) by its installed name: the
wrapper pip writes calls sys.exit(entry()), so an entry point that returns anything but None
or an int exits 1 after a successful run and prints the value to stderr."""

import pytest

from conftest import TINY_FLAGS, console_scripts, read_json, run_console_script

SCRIPTS = console_scripts()


def test_setup_cfg_lists_every_command():
    assert set(SCRIPTS) == {"kd-train-teacher", "kd-train-student", "kd-distill", "kd-report", "kd-eda", "kd-push", "kd-tune",
                            "kd-leaderboard"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_exits_0(name):
    result = run_console_script(name, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout and result.stderr == "", result.stderr[-2000:]


def test_kd_eda_run_exits_0_with_nothing_on_stderr(tiny_dataset, tmp_path):
    result = run_console_script("kd-eda", "--dataset", tiny_dataset, "--output-dir", tmp_path / "eda", "--per-class", "2")
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    assert "split sizes: train 192, test 64" in result.stdout and (tmp_path / "eda" / "eda.json").exists()


def test_kd_distill_run_exits_0_with_nothing_on_stderr(tiny_dataset, tiny_teacher, tmp_path):
    out = tmp_path / "run"
    result = run_console_script("kd-distill", "--teacher", tiny_teacher, "--dataset", tiny_dataset, "--model", "cifar_resnet8",
                                "--output-dir", out, *TINY_FLAGS, "--epochs", "1")
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    assert read_json(out / "metrics.json")["epochs"] == 1


def test_kd_report_run_exits_0(tiny_teacher, tmp_path):
    result = run_console_script("kd-report", tiny_teacher, "--output", tmp_path / "report.md")
    assert result.returncode == 0 and (tmp_path / "report.md").exists(), result.stderr[-2000:]
