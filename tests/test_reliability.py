"""Bad input answered in one line, crash safety, safe loading, non-finite losses, determinism."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_FLAGS, kill_after_epochs, read_json, run_script, write_tiny_cifar


def one_line_error(result, code=2):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("args,message", [
    (["--model", "resnet_nope"], "unknown model 'resnet_nope'; kd models: cifar_rd_mobilenetv2,"),
    (["--lr", "0"], "--lr must be positive"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--batch-size", "ten"], "invalid int value: 'ten'"),
    (["--val-size", "500"], "--val-size 500 must be in [0, 192)"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--no-test-eval", "--push-to-hub", "someone/model"], "--push-to-hub publishes the test metrics in the model card: drop --no-test-eval"),
])
def test_bad_training_flags(args, message, tiny_dataset, tmp_path):
    result = run_script("train_student.py", "--dataset", tiny_dataset, "--output-dir", tmp_path / "x", *TINY_FLAGS, *args, check=False)
    assert message in one_line_error(result)
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_bad_distillation_flags(tiny_dataset, tiny_teacher, tmp_path):
    result = run_script("distill.py", "--teacher", tiny_teacher, "--dataset", tiny_dataset, "--temperature", "0", check=False)
    assert "--temperature must be positive" in one_line_error(result)


def test_dataset_errors(tmp_path):
    missing = run_script("train_student.py", "--dataset", tmp_path / "nowhere", "--output-dir", tmp_path / "a", check=False)
    assert "does not exist" in one_line_error(missing)
    other_name = write_tiny_cifar(tmp_path / "picture", n_train=16, n_test=4, image_column="picture")  # its one image column is found
    result = run_script("train_student.py", "--dataset", other_name, "--output-dir", tmp_path / "b", "--val-size", "0",
                        "--image-column", "img", check=False)
    assert "--image-column 'img': dataset" in one_line_error(result) and "has no such column (its columns: picture" in result.stderr
    hub = run_script("train_student.py", "--dataset", "some-org/not-cached", "--output-dir", tmp_path / "c", check=False,
                     env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert "pass a local copy with --dataset PATH" in one_line_error(hub)


def test_teacher_errors(tiny_dataset, tiny_teacher, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_teacher / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes((tiny_teacher / "model.safetensors").read_bytes()[:5000])
    result = run_script("distill.py", "--teacher", corrupt, "--dataset", tiny_dataset, "--output-dir", tmp_path / "x", check=False)
    assert "is not a readable safetensors file" in one_line_error(result)
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    config = read_json(tiny_teacher / "config.json")
    config["architecture"] = "cifar_resnet14"  # weights of a resnet8 under a resnet14 config
    (mismatch / "config.json").write_text(json.dumps(config))
    (mismatch / "model.safetensors").write_bytes((tiny_teacher / "model.safetensors").read_bytes())
    result = run_script("distill.py", "--teacher", mismatch, "--dataset", tiny_dataset, "--output-dir", tmp_path / "y", check=False)
    assert "does not fit a cifar_resnet14" in one_line_error(result)


def test_teacher_for_another_image_size(tiny_dataset, tiny_teacher, tmp_path):
    other = tmp_path / "t64"
    other.mkdir()
    config = read_json(tiny_teacher / "config.json")
    config["pretrained_cfg"]["input_size"] = [3, 64, 64]
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes((tiny_teacher / "model.safetensors").read_bytes())
    result = run_script("distill.py", "--teacher", other, "--dataset", tiny_dataset, "--output-dir", tmp_path / "x", *TINY_FLAGS, check=False)
    assert "trained on 3x64x64 images but this run's are 3x32x32; pass --image-size 64" in one_line_error(result)


def test_existing_run_is_refused_and_untouched(tiny_teacher, tiny_dataset):
    before = {p.name: p.read_bytes() for p in tiny_teacher.iterdir() if p.is_file()}
    result = run_script("train_teacher.py", "--dataset", tiny_dataset, "--output-dir", tiny_teacher, *TINY_FLAGS, check=False)
    assert "already holds a run; pass --resume" in one_line_error(result)
    assert {p.name: p.read_bytes() for p in tiny_teacher.iterdir() if p.is_file()} == before


def test_batch_not_divisible_by_processes(tiny_dataset, tmp_path):
    result = run_script("train_student.py", "--dataset", tiny_dataset, "--output-dir", tmp_path / "x", *TINY_FLAGS,
                        "--batch-size", "33", processes=2, check=False)
    # each process exits 2 and the first says why, once; the launcher (torchrun) then adds its own
    # failure report and exits 1, which is outside our code
    assert result.returncode != 0 and result.stderr.count("error: --batch-size 33 is not divisible by 2 processes") == 1


@pytest.mark.parametrize("processes", [1, 2])
def test_bad_dataset_under_accelerate_launch(processes, tmp_path):
    """`accelerate launch --quiet`: with one process (the launcher's simple launcher) our line
    is all there is. With several, torchrun's launcher adds its failure report after our line
    (README, Reliability): its "Root Cause" box, most times inside a ChildFailedError traceback
    (once in a CI run on an idle AMD EPYC, the box alone); no traceback comes from our code."""
    missing = tmp_path / "nowhere"
    result = run_script("train_student.py", "--dataset", missing, "--output-dir", tmp_path / "x", "--report-to", "none",
                        processes=processes, launcher=True, check=False)
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    expected = f"error: dataset folder {missing} does not exist; pass --dataset with a folder that holds the parquet files"
    assert result.returncode != 0 and ours == [expected]
    if processes == 1:
        assert result.stderr.strip().splitlines() == ours, result.stderr[-3000:]
    else:
        assert "Root Cause (first observed failure)" in result.stderr and f'File "{REPO / "kd"}' not in result.stderr, result.stderr[-3000:]


def _train_args(dataset, out):
    return ["--dataset", dataset, "--model", "cifar_resnet8", "--output-dir", out, "--epochs", "6", "--batch-size", "32",
            "--val-size", "32", "--report-to", "none", "--lr", "0.05", "--seed", "7"]


def test_kill_then_resume_equals_an_uninterrupted_run(tiny_dataset, tmp_path):
    whole = tmp_path / "whole"
    run_script("train_student.py", *_train_args(tiny_dataset, whole))
    killed = tmp_path / "killed"
    done = kill_after_epochs("train_student.py", killed, 2, *_train_args(tiny_dataset, killed))
    history = killed / "history.jsonl"
    assert 2 <= done < 6, "the run was not killed mid-training"
    assert not (killed / "metrics.json").exists()
    # every file a kill left behind is complete
    for path in killed.rglob("*.json"):
        json.loads(path.read_text())
    load_file(killed / "checkpoint" / "kept_student.safetensors")
    resumed = run_script("train_student.py", *_train_args(tiny_dataset, killed), "--resume")
    assert "epoch 1:" not in resumed.stdout and "epoch 6:" in resumed.stdout  # continued, not restarted
    assert read_json(killed / "metrics.json") == read_json(whole / "metrics.json")
    assert history.read_text() != "" and [json.loads(l)["loss"] for l in history.read_text().splitlines()] == \
        [json.loads(l)["loss"] for l in (whole / "history.jsonl").read_text().splitlines()]


def test_resume_in_another_precision_says_what_differs(tiny_dataset, tmp_path):
    """A bf16 checkpoint resumed where the policy picks fp16 (a V100, a T4) once read as damaged:
    fp16 loads a loss scaler's state that a bf16 checkpoint lacks. The precision is compared
    first, and the one line says what differs and how to continue."""
    from kd.errors import UsageError
    from kd.train.runner import check_resumable

    out = tmp_path / "run"
    run_script("train_student.py", *_train_args(tiny_dataset, out), "--epochs", "1", "--mixed-precision", "bf16")
    result = run_script("train_student.py", *_train_args(tiny_dataset, out), "--epochs", "1", "--mixed-precision", "no", "--resume", check=False)
    assert one_line_error(result) == ("error: --resume: the checkpoint was trained in bf16, this run is fp32; "
                                      "pass --mixed-precision bf16 or start a new --output-dir")
    on_a_v100 = {**read_json(out / "run_config.json"), "mixed_precision": "fp16"}  # no fp16 run on a CPU: its resolved config
    with pytest.raises(UsageError, match=r"^--resume: the checkpoint was trained in bf16, this run is fp16; pass --mixed-precision bf16 or"):
        check_resumable(out, on_a_v100)
    check_resumable(out, read_json(out / "run_config.json"))  # the same precision resumes


def test_same_seed_same_metrics(tiny_dataset, tmp_path):
    first, second = (run_script("train_student.py", *_train_args(tiny_dataset, tmp_path / name), "--epochs", "2") for name in ("a", "b"))
    assert read_json(tmp_path / "a" / "metrics.json") == read_json(tmp_path / "b" / "metrics.json")
    assert load_file(tmp_path / "a" / "model.safetensors")["fc.weight"].equal(load_file(tmp_path / "b" / "model.safetensors")["fc.weight"])


def test_pickle_that_runs_code_is_refused(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    run_script("train_student.py", *_train_args(tiny_dataset, out), "--epochs", "1")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    (out / "checkpoint" / "optimizer.bin").write_bytes(pickle.dumps(Exploit()))
    result = run_script("train_student.py", *_train_args(tiny_dataset, out), "--epochs", "1", "--resume", check=False)
    assert "refused to resume from" in one_line_error(result) and "unsafe pickle" in result.stderr
    assert not marker.exists()


NAN_SCRIPT = """
import sys, torch
from kd.train import runner
from kd.config import RunArgs, TrainConfig
from kd.distillers import Supervised

class GoesNaN(Supervised):
    calls = 0
    def forward(self, images, labels, index=None):
        GoesNaN.calls += 1
        logits, terms = super().forward(images, labels, index)
        if GoesNaN.calls > 8:  # epoch 1 has 5 steps: fine; epoch 2 goes bad
            terms["loss_ce"] = terms["loss_ce"] * float("nan")
        return logits, terms

cfg = TrainConfig(model="cifar_resnet8", epochs=3, batch_size=32, val_size=32, lr=0.05)
run = RunArgs(dataset=sys.argv[1], output_dir=sys.argv[2], report_to="none")
runner.run(cfg, run, lambda student, data, accelerator: GoesNaN(student))
"""


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path):
    script = tmp_path / "nan.py"
    script.write_text("from kd.errors import main_guard\n" + NAN_SCRIPT.replace("runner.run(", "main_guard(runner.run)("))
    result = subprocess.run([sys.executable, str(script), str(tiny_dataset), str(tmp_path / "run")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    line = one_line_error(result, code=1)
    assert "non-finite loss at step" in line and "of epoch 2" in line and "loss_ce=nan" in line
    state = read_json(tmp_path / "run" / "checkpoint" / "trainer_state.json")
    assert state["epoch"] == 1
    weights = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_metrics_json_comes_last_so_a_run_whose_card_failed_is_not_taken_for_done(tiny_dataset, tiny_teacher, tmp_path):
    """metrics.json marks a run done for the driver and kd.report: a finish that fails at the
    model card leaves none, and the next --resume writes the figures, the card and metrics.json."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_teacher, run)
    for written in ("metrics.json", "README.md", "confusion_matrix.png"):
        (run / written).unlink()
    (run / "README.md").mkdir()  # the card cannot be written over a folder
    flags = ("train_teacher.py", "--dataset", tiny_dataset, "--model", "cifar_resnet8", "--output-dir", run, *TINY_FLAGS, "--resume")
    assert run_script(*flags, check=False).returncode != 0
    assert not (run / "metrics.json").exists() and (run / "confusion_matrix.png").is_file()
    (run / "README.md").rmdir()
    run_script(*flags)
    assert "test" in json.loads((run / "metrics.json").read_text()) and (run / "README.md").is_file()


def test_no_test_eval_leaves_no_test_figures_and_cannot_be_published(tiny_dataset, tiny_teacher, tmp_path):
    """A finished run re-finished with --resume --no-test-eval keeps no test figures beside its
    metrics; such a folder (a kd.tune trial has the same) is refused by kd.hub push in one line."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_teacher, run)
    assert (run / "confusion_matrix.png").is_file() and (run / "README.md").is_file()
    result = run_script("train_teacher.py", "--dataset", tiny_dataset, "--model", "cifar_resnet8", "--output-dir", run, *TINY_FLAGS,
                        "--resume", "--no-test-eval")
    assert "test not evaluated (--no-test-eval)" in result.stdout
    assert "test" not in json.loads((run / "metrics.json").read_text()) and "val" in json.loads((run / "metrics.json").read_text())
    assert not (run / "confusion_matrix.png").exists() and not (run / "README.md").exists()
    push = subprocess.run([sys.executable, "-m", "kd.hub", "push", str(run), "--repo-id", "someone/model"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert "was trained with --no-test-eval (e.g. a kd.tune trial): it has no test metrics to publish" in one_line_error(push)


@pytest.mark.parametrize("content,message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe garbage", r"config file .*bad\.yaml is not a UTF-8 text file \(byte 0 is b'\\x89'\); pass a YAML file"),
    (b"lr: [0.1\n  epochs: 2\n", r"config file .*bad\.yaml is not valid YAML at line 2, column 9: expected ',' or '\]', but got ':'$"),
])
def test_config_file_that_is_not_yaml_text_is_one_line(content, message, tmp_path):
    """A binary file passed as --config once ended in UnicodeDecodeError (the YAML errors were
    caught only after the file was read as text); PyYAML's message spans several lines."""
    from kd.cli import train_parser
    from kd.config import parse
    from kd.errors import UsageError

    (tmp_path / "bad.yaml").write_bytes(content)
    with pytest.raises(UsageError, match=message) as refused:
        parse(train_parser("student"), ["--config", str(tmp_path / "bad.yaml")])
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("flags,message", [
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number, got inf"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--dkd-beta", "inf"], "--dkd-beta must be a finite number, got inf"),
])
def test_non_finite_settings_are_refused(flags, message, tmp_path):
    """inf passes every `> 0` check (and nan every `< 0` one): such a run trained to a non-finite
    loss; from a preset (YAML's .inf) as from the command line."""
    from kd.cli import distill_parser
    from kd.config import parse
    from kd.errors import UsageError

    with pytest.raises(UsageError, match=f"^{message}$"):
        parse(distill_parser(), flags)
    (tmp_path / "preset.yaml").write_text(f"{flags[0][2:]}: {'.inf' if flags[1] == 'inf' else '.nan'}\n")
    with pytest.raises(UsageError, match=f"^{message}$"):
        parse(distill_parser(), ["--config", str(tmp_path / "preset.yaml")])


def test_non_finite_loss_in_the_first_epoch_claims_no_checkpoint(tiny_dataset, tmp_path):
    """A loss that is non-finite from the start said "the last good checkpoint (epoch 0) is
    kept", and there was none."""
    from kd.train import runner
    from kd.config import RunArgs, TrainConfig
    from kd.distillers import Supervised
    from kd.errors import RunError

    class NaNFromTheStart(Supervised):
        def forward(self, images, labels, index=None):
            logits, terms = super().forward(images, labels, index)
            return logits, {name: term * float("nan") for name, term in terms.items()}

    cfg = TrainConfig(model="cifar_resnet8", epochs=2, batch_size=32, val_size=32, lr=0.05)
    run = RunArgs(dataset=str(tiny_dataset), output_dir=str(tmp_path / "run"), report_to="none")
    with pytest.raises(RunError, match=r"of epoch 1 \(loss_ce=nan\); stopped, no checkpoint was saved yet; try a lower --lr$"):
        runner.run(cfg, run, lambda student, data, accelerator: NaNFromTheStart(student))
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_a_class_missing_from_the_test_split_is_said(tmp_path, capfd):
    """F1 of a class with no test image is 0 (scikit-learn's zero_division=0) and the macro mean
    counts it: one warning line names it."""
    from kd.cli import train

    dataset = write_tiny_cifar(tmp_path / "data", n_train=96, n_test=3)  # test labels 0, 1, 2: no "dark"
    metrics = train("student", ["--dataset", str(dataset), "--model", "cifar_resnet8", "--output-dir", str(tmp_path / "run"),
                                "--epochs", "1", "--batch-size", "32", "--val-size", "0", "--report-to", "none"])
    assert metrics["test"]["per_class"]["dark"]["support"] == 0
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: the test split has no image of class dark: its F1 counts as 0 in the test f1_macro, "
                        "a mean over all 4 classes"]


@pytest.mark.parametrize("name,content,message", [
    ("metrics.json", "null", "metrics.json holds null, not a JSON object"),
    ("metrics.json", "[]", "metrics.json holds a list, not a JSON object"),
    ("metrics.json", '{"test": 5}', "metrics.json: its test entry is a number, not an object of metrics"),
    ("metrics.json", '{"test": {"accuracy": "high"}}', "metrics.json: its test metrics lack accuracy, f1_macro, precision_macro, recall_macro as numbers"),
    ("run_config.json", "null", "run_config.json holds null, not a JSON object"),
    ("run_config.json", '{"train": 5}', "run_config.json is not a kd run config (train is a number)"),
    ("run_config.json", '{"train": {"model": "cifar_resnet8"}, "run": []}', "run_config.json: its run section is a list, not an object"),
])
def test_report_on_json_of_the_wrong_shape_is_one_line(name, content, message, tiny_teacher, tmp_path, capsys):
    import shutil

    from kd.lab import report

    run = tmp_path / "run"
    shutil.copytree(tiny_teacher, run)
    (run / name).write_text(content)
    with pytest.raises(SystemExit) as stopped:
        report.main([str(run), "--output", str(tmp_path / "report.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and message in err[0] and str(run / name) in err[0], err


def test_leaderboard_report_on_a_damaged_history_is_one_line(tmp_path):
    from kd.errors import UsageError
    from kd.lab.ranking import history

    (tmp_path / "history.jsonl").write_text('{"epoch": 1}\n[1]\n')
    with pytest.raises(UsageError, match=r"history\.jsonl: line 2 is not a JSON object of an epoch's record"):
        history(tmp_path)
