"""kd.lab.record: a leaderboard's small files saved into a record and restored from it, never weights,
and never the runs of one teacher beside another's (fabricated folders; the whole driver with a
record is in test_leaderboard.py)."""

import hashlib
import json
import sqlite3

import pytest

from kd.lab import record


def write(path, text="{}"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def run(folder, teacher=None, val=0.5):
    write(folder / "metrics.json", json.dumps({"val": {"f1_macro": val}}))
    write(folder / "run_config.json", json.dumps({"train": {"seed": 0}, **({"teacher": teacher} if teacher else {"role": "student"})}))
    write(folder / "history.jsonl", '{"epoch": 1}\n')
    write(folder / "model.safetensors", "weights")  # never recorded
    (folder / "checkpoint").mkdir()


def search(folder):
    folder.mkdir(parents=True)
    with sqlite3.connect(folder / "study.db") as study:
        study.execute("create table trials (number integer, state text)")  # Optuna's table, the columns kd.lab.record reads
        study.execute("insert into trials values (0, 'PRUNED')")
    study.close()
    write(folder / "tune.json", '{"trials": 1}')
    write(folder / "best.yaml", "lr: 0.4\n")
    write(folder / "trials" / "000" / "history.jsonl", '{"epoch": 1}\n')  # pruned: no metrics.json
    write(folder / "trials" / "000" / "model.safetensors", "weights")


def leaderboard_folder(root, weights="teacher weights"):
    write(root / "runs" / "teacher" / "metrics.json")
    write(root / "runs" / "teacher" / "model.safetensors", weights)
    run(root / "runs" / "student" / "default" / "s0")
    run(root / "runs" / "logits" / "default" / "s0", teacher=str(root / "runs" / "teacher"))
    write(root / "plain" / "s0" / "metrics.json")
    write(root / "plain" / "s0" / "history.jsonl")
    search(root / "tune" / "student")
    search(root / "tune" / "logits")
    (root / "runs" / "logits" / "default" / "s1").mkdir(parents=True)  # unfinished: not an item
    return root


def files(root):
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


MADE_WITH = {"budget": "cpu", "dataset": "d", "flags": [], "precision": "fp32", "machine": "cpu A",
             "presets": {"teacher": {"model": "r20", "lr": 0.1}, "student": {"model": "r8", "lr": 0.4}}}


def recording(kept, out, **made_with):
    return record.Recording(kept, out, {**MADE_WITH, **made_with})


def test_save_keeps_the_small_files_and_the_teachers_hash_never_weights(tmp_path):
    out, kept = leaderboard_folder(tmp_path / "lb"), tmp_path / "record"
    recording(kept, out).save()
    small = ["history.jsonl", "metrics.json", "run_config.json"]
    search_files = ["best.yaml", "study.db", "trials/000/history.jsonl", "tune.json"]
    assert files(kept) == sorted([*(f"runs/{row}/default/s0/{name}" for row in ("logits", "student") for name in small),
                                  "runs/teacher/metrics.json", "runs/teacher/model.safetensors.sha256", "driver.json",
                                  "plain/s0/history.jsonl", "plain/s0/metrics.json",
                                  *(f"tune/{row}/{name}" for row in ("logits", "student") for name in search_files)])
    assert (kept / "runs/teacher/model.safetensors.sha256").read_text() == hashlib.sha256(b"teacher weights").hexdigest() + "\n"
    assert json.loads((kept / "driver.json").read_text()) == MADE_WITH
    with sqlite3.connect(kept / "tune/logits/study.db") as study:  # a working copy of the study
        assert study.execute("select number from trials").fetchall() == [(0,)]


def test_restore_brings_back_what_needs_no_teacher_and_the_rest_only_with_the_same_teacher(tmp_path, capsys):
    kept = tmp_path / "record"
    recording(kept, leaderboard_folder(tmp_path / "lb")).save()
    fresh = tmp_path / "new-machine"
    (fresh / "plain" / "s0").mkdir(parents=True)  # a folder here, finished or not, always wins
    restored = recording(kept, fresh).restore()
    assert sorted(map(str, restored)) == ["runs/student/default/s0", "tune/student"]
    assert "need the teacher are not restored: there is no teacher here yet" in capsys.readouterr().out
    assert not (fresh / "runs" / "teacher").exists() and not list((fresh / "plain" / "s0").iterdir())
    write(fresh / "runs" / "teacher" / "metrics.json")
    write(fresh / "runs" / "teacher" / "model.safetensors", "teacher weights")  # trained again: the same weights
    again = recording(kept, fresh)
    assert again.restore(only=record.Path("tune/logits")) == [record.Path("tune/logits")]
    assert again.restore() == [record.Path("runs/logits/default/s0")] and "not restored" not in capsys.readouterr().out
    assert (fresh / "tune/logits/study.db").is_file() and (fresh / "tune/logits/trials/000/history.jsonl").is_file()


def test_another_teacher_gets_nothing_of_the_record_and_adds_nothing_to_it(tmp_path, capsys):
    kept = tmp_path / "record"
    recording(kept, leaderboard_folder(tmp_path / "lb")).save()
    before = {name: (kept / name).read_bytes() for name in files(kept)}
    other = leaderboard_folder(tmp_path / "other", weights="other weights")
    run(other / "runs" / "dkd" / "default" / "s0", teacher="t")
    recording(kept, other).save()
    assert "the teacher here is not the record's" in capsys.readouterr().out
    assert {name: (kept / name).read_bytes() for name in files(kept)} == before  # not even its baseline
    fresh = tmp_path / "new-machine"
    write(fresh / "runs" / "teacher" / "metrics.json")
    write(fresh / "runs" / "teacher" / "model.safetensors", "other weights")
    restored = recording(kept, fresh).restore()
    assert sorted(map(str, restored)) == ["plain/s0", "runs/student/default/s0", "tune/student"]
    assert "its runs train here again" in capsys.readouterr().out


def test_a_record_made_otherwise_is_refused_in_one_line(tmp_path):
    kept = tmp_path / "record"
    recording(kept, leaderboard_folder(tmp_path / "lb")).save()
    for key, value in (("machine", "cpu B"), ("precision", "bf16"), ("flags", ["--epochs", "1"]), ("budget", "gpu")):
        with pytest.raises(record.UsageError, match=rf"^the record {kept} was made with {key} .*: give it another --record folder$"):
            recording(kept, tmp_path / "elsewhere", **{key: value})
    # a preset changed since is another protocol: the setting that differs is named
    presets = {"teacher": {"model": "r20", "lr": 0.2}, "student": MADE_WITH["presets"]["student"]}
    with pytest.raises(record.UsageError, match=rf"^the record {kept} was made with presets.teacher.lr 0.1, this driver's is 0.2: give"):
        recording(kept, tmp_path / "elsewhere", presets=presets)
    presets = {"teacher": {"model": "r20"}, "student": MADE_WITH["presets"]["student"]}
    with pytest.raises(record.UsageError, match=r"presets.teacher.lr 0.1, which this driver does not set: give it another --record folder$"):
        recording(kept, tmp_path / "elsewhere", presets=presets)
    # a setting kept as None is a value, not a missing one: both sides are named
    unset = {**MADE_WITH, "presets": {"teacher": {"model": "r20", "lr": None}, "student": MADE_WITH["presets"]["student"]}}
    (kept / "driver.json").write_text(json.dumps(unset))
    with pytest.raises(record.UsageError, match=r"presets.teacher.lr None, this driver's is 0.1: give it another --record folder$"):
        recording(kept, tmp_path / "elsewhere")
    older = {key: value for key, value in MADE_WITH.items() if key != "presets"}
    (kept / "driver.json").write_text(json.dumps(older))  # as an older kd wrote it
    with pytest.raises(record.UsageError, match=rf"^the record {kept} has no presets: give it another --record folder$"):
        recording(kept, tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_a_restore_cut_short_leaves_no_folder_and_the_next_restores_it_whole(tmp_path, monkeypatch):
    kept = tmp_path / "record"
    recording(kept, leaderboard_folder(tmp_path / "lb")).save()
    copied = []

    def copy_then_die(target, data):
        if target.name == "metrics.json":
            raise KeyboardInterrupt  # killed before the file that marks the run done
        copied.append(target.name)

    monkeypatch.setattr(record, "write_bytes_atomic", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        recording(kept, tmp_path / "fresh").restore(only=record.Path("runs/student/default/s0"))
    assert copied == ["run_config.json", "history.jsonl"]
    assert not (tmp_path / "fresh/runs/student/default/s0").exists() and not list((tmp_path / "fresh").iterdir())  # nothing half-copied left
    monkeypatch.undo()
    assert recording(kept, tmp_path / "fresh").restore() and files(tmp_path / "fresh/runs/student/default/s0") == [
        "history.jsonl", "metrics.json", "run_config.json"]  # the next driver restores it whole


def test_a_run_started_over_while_it_is_read_is_left_as_the_record_had_it(tmp_path, monkeypatch):
    """Another driver on the folder starts a tuned run over (its files deleted, a new config
    written) while this one reads it for the record: the record keeps the old run, whole, and
    takes the new one once it has finished."""
    out = leaderboard_folder(tmp_path / "lb")
    kept = tmp_path / "record"
    recording(kept, out).save()
    folder = out / "runs" / "student" / "default" / "s0"
    read_bytes, seen = record.Path.read_bytes, []

    def start_over_midway(path):
        data = read_bytes(path)
        if path == folder / "metrics.json" and not seen:  # just read: now the other driver clears the run and starts it
            seen.append(path)
            for name in ("metrics.json", "history.jsonl"):
                (folder / name).unlink()
            write(folder / "run_config.json", json.dumps({"train": {"seed": 0, "lr": 0.2}, "role": "student"}))
        return data

    monkeypatch.setattr(record.Path, "read_bytes", start_over_midway)
    record.copy_item(out / "runs/student/default/s0", kept / "runs/student/default/s0")
    monkeypatch.undo()
    saved = kept / "runs" / "student" / "default" / "s0"
    assert json.loads((saved / "run_config.json").read_text()) == {"train": {"seed": 0}, "role": "student"}  # the old run, whole
    assert (saved / "metrics.json").is_file() and not list(kept.rglob(".*"))  # no temporary file left
    run_again = json.loads((folder / "run_config.json").read_text())
    write(folder / "metrics.json", json.dumps({"val": {"f1_macro": 0.6}}))  # the new run finished
    recording(kept, out).save()
    assert json.loads((saved / "run_config.json").read_text()) == run_again
    assert json.loads((saved / "metrics.json").read_text()) == {"val": {"f1_macro": 0.6}}


def test_a_search_saved_while_a_trial_trains_leaves_that_trial_out(tmp_path):
    """A save mid-search takes the trials that are over, not the running one's growing folder: the
    search resumed from the record trains that trial again."""
    out = leaderboard_folder(tmp_path / "lb")
    search_folder = out / "tune" / "student"
    with sqlite3.connect(search_folder / "study.db") as study:
        study.execute("insert into trials values (1, 'COMPLETE'), (2, 'RUNNING')")
    study.close()
    for number in ("001", "002"):
        write(search_folder / "trials" / number / "history.jsonl", '{"epoch": 1}\n')
    recording(tmp_path / "record", out).save()
    assert sorted(path.name for path in (tmp_path / "record" / "tune" / "student" / "trials").iterdir()) == ["000", "001"]


def test_a_restored_run_gets_its_curves_and_confusion_matrix_drawn_again_from_its_small_files(tmp_path):
    out, kept = leaderboard_folder(tmp_path / "lb"), tmp_path / "record"
    test = {"confusion_matrix": [[3, 1], [0, 4]], "per_class": {"cat": {"f1": 0.8}, "dog": {"f1": 0.9}}}
    write(out / "runs/student/default/s0/metrics.json", json.dumps({"test": test, "val": {"f1_macro": 0.5}}))
    write(out / "runs/student/default/s0/history.jsonl", '{"epoch": 1, "loss": 2.0, "val_f1_macro": 0.4}\n')
    recording(kept, out).save()
    assert not list(kept.rglob("*.png"))  # the record keeps small files only
    fresh = tmp_path / "new-machine"
    recording(kept, fresh).restore()
    restored = fresh / "runs/student/default/s0"
    assert (restored / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG" and (restored / "curves.png").is_file()
    assert not (fresh / "plain/s0/confusion_matrix.png").exists()  # no test split in its metrics: nothing to draw


def test_a_driver_killed_mid_restore_leaves_a_staging_folder_that_the_next_restore_sweeps(tmp_path):
    import os
    import subprocess
    import sys

    kept, fresh = tmp_path / "record", tmp_path / "fresh"
    recording(kept, leaderboard_folder(tmp_path / "lb")).save()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    killed = fresh / f".restoring.{dead.stdout.strip()}.abc"  # SIGKILL: its finally never ran
    running = fresh / f".restoring.{os.getpid()}.def"  # a driver still restoring into this folder
    write(killed / "runs/student/default/s0/history.jsonl")
    write(running / "runs/student/default/s0/history.jsonl")
    recording(kept, fresh).restore()
    assert not killed.exists() and running.exists()
    assert (fresh / "runs/student/default/s0/metrics.json").is_file()


def test_no_file_a_record_keeps_is_hidden_from_git_by_an_ignore_pattern():
    """A record is a folder to commit: an ignore pattern matching a row's name (an unanchored
    `dist/` once hid every DIST run of every record) loses those runs without a word. The files
    kd.lab.record keeps for every method's default and tuned runs, its searches, the teacher and the
    plain loop are checked against this repository's .gitignore."""
    import subprocess
    from pathlib import Path

    from kd.lab.experiment import all_modes
    from kd.lab.space import SUPERVISED

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout (an unpacked sdist): no .gitignore to check")
    kept = Path("results/lb")
    rows = ["student" if mode == SUPERVISED else mode for mode in all_modes()]  # the rows' folder names
    paths = [kept / "runs" / row / kind / "s0" / name for row in rows for kind in ("default", "tuned") for name in record.RUN_FILES]
    paths += [kept / "tune" / row / name for row in rows for name in record.SEARCH_FILES]
    paths += [kept / "tune" / row / "trials" / "000" / name for row in rows for name in record.RUN_FILES]
    paths += [kept / record.TEACHER / name for name in (*record.RUN_FILES, record.WEIGHTS_HASH)]
    paths += [kept / "plain" / "s0" / "metrics.json", kept / record.MADE_WITH, kept / "leaderboard.png"]
    checked = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=root, input="\n".join(map(str, paths)),
                             capture_output=True, text=True)
    assert checked.returncode in (0, 1), checked.stderr  # 0: some are ignored, 1: none is
    assert checked.stdout.split() == []
