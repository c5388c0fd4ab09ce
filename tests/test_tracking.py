"""wandb through accelerate's tracker, offline: what a run logs is read back from the run's
.wandb file (a leveldb-style log of protobuf records; wandb 0.31 ships no Python reader)."""

import json
import os
import struct
from pathlib import Path

import pytest

from conftest import TINY_FLAGS, read_json, run_script

BLOCK = 32768  # leveldb log block size; a record header never straddles two blocks
HEADER = 7  # 4-byte CRC, 2-byte length, 1-byte chunk type
FULL, LAST = 1, 4


def wandb_records(path: Path):
    """The protobuf Records of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    position, pieces = 7, b""  # the file header (":W&B", magic, version) takes 7 bytes
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # zero padding at the end of a block
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        pieces += data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def logged(run_dir: Path):
    """({step: {key: value}} of the logged history, {key: value} of the config) of the one
    offline wandb run in run_dir/wandb."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    history, config = {}, {}
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.setdefault(record.history.step.num, {}).update(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return history, config


@pytest.fixture
def no_wandb_settings(monkeypatch, tmp_path):
    """No wandb credentials or folder settings from the machine running the tests."""
    for name in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # an empty home: no ~/.netrc, no ~/.config/wandb
    (tmp_path / "home").mkdir()


def train_with_wandb(dataset, out, env=None):
    return run_script("train_student.py", "--dataset", dataset, "--model", "cifar_resnet8", "--output-dir", out,
                      *TINY_FLAGS, "--report-to", "wandb", "--run-name", "tiny-student", env=env)


def test_wandb_offline_run_holds_history_test_metrics_and_config(tiny_dataset, tmp_path, no_wandb_settings):
    out = tmp_path / "run"
    train_with_wandb(tiny_dataset, out, env={"WANDB_MODE": "offline"})
    history, config = logged(out)
    epochs = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert sorted(history) == [1, 2]
    for record in epochs:
        row = history[record["epoch"]]
        for key in ("loss_ce", "loss", "lr", "images_per_s", "val_accuracy", "val_f1_macro"):
            assert row[key] == pytest.approx(record[key]), key
    test = read_json(out / "metrics.json")["test"]
    final = history[2]
    assert final["test/accuracy"] == pytest.approx(test["accuracy"]) and final["test/f1_macro"] == pytest.approx(test["f1_macro"])
    assert final["test/red/support"] == test["per_class"]["red"]["support"]
    # wandb.plot.confusion_matrix logs a table of (actual, predicted, count), kept as a file of the run
    assert final["test/confusion_matrix_table/_type"] == "table-file" and final["test/confusion_matrix_table/ncols"] == 3
    table_file = next((out / "wandb").glob("offline-run-*/files")) / final["test/confusion_matrix_table/path"]
    table = json.loads(table_file.read_text())
    names = read_json(out / "run_config.json")["data"]["class_names"]
    counts = {(actual, predicted): count for actual, predicted, count in table["data"]}
    matrix = test["confusion_matrix"]
    assert counts == {(names[i], names[j]): matrix[i][j] for i in range(len(names)) for j in range(len(names))}
    assert sum(map(sum, matrix)) == test["num_samples"]
    assert sum(matrix[i][i] for i in range(len(names))) == round(test["accuracy"] * test["num_samples"])
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert config["train.lr"] == 0.05 and config["train.model"] == "cifar_resnet8" and config["role"] == "student"


def test_wandb_without_credentials_falls_back_to_offline_with_one_notice(tiny_dataset, tmp_path, no_wandb_settings):
    out = tmp_path / "run"
    result = train_with_wandb(tiny_dataset, out)
    notices = [line for line in result.stderr.splitlines() if "no credentials" in line]
    assert len(notices) == 1 and "logging offline" in notices[0], result.stderr  # once, not once per process or epoch
    assert (out / "metrics.json").exists()
    history, _ = logged(out)  # it did log, offline
    assert sorted(history) == [1, 2]


def test_credentials_are_looked_up_where_wandb_looks(tmp_path, monkeypatch, no_wandb_settings):
    from kd.train.tracking import resolve_trackers

    netrc = tmp_path / "netrc"
    netrc.write_text("machine wandb.example.com\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    notices = []
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a self-hosted server the netrc has a key for
    assert resolve_trackers("wandb", notices.append) == ["wandb"] and notices == [] and "WANDB_MODE" not in os.environ
    monkeypatch.setenv("WANDB_BASE_URL", "https://other.example.com")  # no key for this one: offline, said once
    assert resolve_trackers("wandb", notices.append) == ["wandb"] and len(notices) == 1
    assert os.environ["WANDB_MODE"] == "offline"


def wandb_run_ids(run_dir: Path):
    """The run id of every offline wandb run written under run_dir/wandb, oldest first."""
    ids = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        ids += [record.run.run_id for record in wandb_records(path) if record.WhichOneof("record_type") == "run"][:1]
    return ids


def test_resume_continues_the_same_wandb_run(tiny_dataset, tmp_path, no_wandb_settings):
    out = tmp_path / "run"
    train_with_wandb(tiny_dataset, out, env={"WANDB_MODE": "offline"})
    run_id = read_json(out / "run_config.json")["tracker_run_id"]
    run_script("train_student.py", "--dataset", tiny_dataset, "--model", "cifar_resnet8", "--output-dir", out, *TINY_FLAGS,
               "--report-to", "wandb", "--run-name", "tiny-student", "--resume", env={"WANDB_MODE": "offline"})
    assert wandb_run_ids(out) == [run_id, run_id]  # one wandb run, written in two sessions
    assert read_json(out / "run_config.json")["tracker_run_id"] == run_id


def test_tensorboard_writes_inside_the_run_folder_and_overwrite_replaces_the_run(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", tiny_dataset, "--model", "cifar_resnet8", "--output-dir", out, *TINY_FLAGS, "--epochs", "1",
            "--report-to", "tensorboard", "--project", "proj"]
    run_script("train_student.py", *args)
    events = set(out.rglob("events.out.tfevents.*"))  # the scalars, and the hparams in a subfolder
    assert events and all((out / "tensorboard" / "proj") in path.parents for path in events), events
    first_id = read_json(out / "run_config.json")["tracker_run_id"]
    run_script("train_student.py", *args, "--overwrite", "--seed", "1")
    after = set(out.rglob("events.out.tfevents.*"))
    assert len(after) == len(events) and not after & events, after  # the first run's events are gone, not mixed in
    resolved = read_json(out / "run_config.json")  # --overwrite: a new run, nothing carried over
    assert resolved["train"]["seed"] == 1 and resolved["tracker_run_id"] != first_id
    assert len((out / "history.jsonl").read_text().splitlines()) == 1 and read_json(out / "metrics.json")["epochs"] == 1
