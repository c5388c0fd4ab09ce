import pytest

from kd.config import build_parser, parse
from kd.distillers import DISTILLERS
from kd.errors import UsageError


def parser():
    return build_parser("distill.py", "", {"model": "cifar_resnet8x4"}, distill_modes=list(DISTILLERS))


def test_defaults_then_yaml_then_command_line(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("epochs: 7\nlr: 0.05\ntemperature: 2\nbatch-size: 64\n")
    train, distill, run = parse(parser(), ["--config", str(preset), "--lr", "0.3", "--dataset", "/data"])
    assert (train.epochs, train.lr, train.batch_size, distill.temperature) == (7, 0.3, 64, 2)
    assert train.model == "cifar_resnet8x4" and train.weight_decay == 5e-4 and run.dataset == "/data"


def test_unknown_yaml_key_is_a_usage_error(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("epocs: 7\n")
    with pytest.raises(UsageError, match="unknown option 'epocs'"):
        parse(parser(), ["--config", str(preset)])


def test_training_scripts_have_no_teacher_flags():
    options = {o for action in build_parser("train_student.py", "", {})._actions for o in action.option_strings}
    assert "--lr" in options and "--teacher" not in options and "--mode" not in options


def test_default_dataset_is_kd_dataset_else_the_hub_id(monkeypatch):
    monkeypatch.delenv("KD_DATASET", raising=False)
    assert parse(parser(), [])[2].dataset == "uoft-cs/cifar10"
    monkeypatch.setenv("KD_DATASET", "/data/cifar10")  # read when the command line is parsed, not at import
    assert parse(parser(), [])[2].dataset == "/data/cifar10"


@pytest.mark.parametrize("line,message", [
    ("mode: nope", "mode: 'nope' is not one of logits, hidden, hidden-trained, hybrid, at"),
    ("report_to: x", "report_to: 'x' is not one of wandb, tensorboard, all, none"),
    ("mixed_precision: fp32", "mixed_precision: 'fp32' is not one of no, bf16, fp16"),
    ("epochs: ten", "epochs: 'ten' is not a valid int"),
    ("lr: [1, 2]", "lr: [1, 2] is not a single float value"),
    ("channels_last: maybe", "channels_last: 'maybe' is not one of true, false"),
    ("epocs: 7", "unknown option 'epocs'; valid options: model, epochs,"),
])
def test_bad_yaml_value_names_the_file_the_key_and_the_valid_values(line, message, tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text(line + "\n")
    with pytest.raises(UsageError) as error:
        parse(parser(), ["--config", str(preset)])
    assert str(error.value).startswith(f"config file {preset}: ") and message in str(error.value)


def test_yaml_values_are_parsed_as_the_command_line_parses_them(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("mixed_precision: no\nlr: 1e-3\nchannels_last: false\ntags: one\nmax_train_samples: null\n")
    train, _, run = parse(parser(), ["--config", str(preset)])
    assert (run.mixed_precision, train.lr, run.channels_last, run.tags, train.max_train_samples) == ("no", 1e-3, False, ("one",), None)


def test_bad_preset_under_a_script_is_one_line(tiny_dataset, tmp_path):
    from conftest import run_script

    preset = tmp_path / "preset.yaml"
    preset.write_text("report_to: x\n")
    result = run_script("train_student.py", "--config", preset, "--dataset", tiny_dataset, "--output-dir", tmp_path / "out", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: config file {preset}: report_to:"), result.stderr
    assert not (tmp_path / "out").exists()


def test_channels_last_is_on_by_default_and_no_channels_last_turns_it_off():
    assert parse(parser(), [])[2].channels_last is True
    assert parse(parser(), ["--no-channels-last"])[2].channels_last is False


def test_lr_milestones_from_yaml_and_command_line_are_epochs(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("lr_milestones: [150, 180, 210]\n")
    train, _, _ = parse(parser(), ["--config", str(preset)])
    assert tuple(train.lr_milestones) == (150.0, 180.0, 210.0) and train.lr_decay == 0.1
    train, _, _ = parse(parser(), ["--config", str(preset), "--lr-milestones", "2.5", "--lr-decay", "0.5"])
    assert tuple(train.lr_milestones) == (2.5,) and train.lr_decay == 0.5
    assert tuple(parse(parser(), [])[0].lr_milestones) == ()  # default: the cosine schedule
    for bad in (["--lr-milestones", "180", "150"], ["--lr-milestones", "0"], ["--lr-milestones", "10", "--lr-decay", "0"]):
        with pytest.raises(UsageError, match="--lr-milestones must be increasing epochs > 0"):
            parse(parser(), bad)
    preset.write_text("lr_milestones: [150, soon]\n")
    with pytest.raises(UsageError, match="lr_milestones: .* is not a list of float values"):
        parse(parser(), ["--config", str(preset)])


def test_a_run_saved_before_a_field_existed_counts_as_its_default():
    """A run_config.json written before --lr-milestones/--lr-decay existed trained as their
    defaults do: --resume, kd.tune's --reuse-runs (changed_setting) and the reports' rows
    (run_settings) must match it with a run of today's defaults, and still tell a real change."""
    import dataclasses
    import json
    from pathlib import Path

    from kd.config import TrainConfig
    from kd.lab.runs import Run, run_settings
    from kd.train.runner import changed_setting

    now = json.loads(json.dumps({"train": dataclasses.asdict(TrainConfig()), "distill": None, "run": {}}))
    old = {**now, "train": {k: v for k, v in now["train"].items() if k not in ("lr_milestones", "lr_decay")}}
    assert changed_setting(old, now) is None
    assert run_settings(Run(Path("old"), old, {})) == run_settings(Run(Path("new"), now, {}))
    decayed = {**now, "train": {**now["train"], "lr_milestones": [5.0]}}
    assert changed_setting(old, decayed) == ("lr_milestones", [], [5.0])
