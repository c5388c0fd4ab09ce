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


def test_default_dataset_is_the_hub_id(monkeypatch):
    _, _, run = parse(parser(), [])
    assert run.dataset == "uoft-cs/cifar10"
