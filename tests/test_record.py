"""kd.record: a leaderboard's small files saved into a record and restored from it, never weights,
and never the runs of one teacher beside another's (fabricated folders; the whole driver with a
record is in test_leaderboard.py)."""

import hashlib
import json
import sqlite3

from kd import record


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
        study.execute("create table trials (number integer)")
        study.execute("insert into trials values (0)")
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


def test_save_keeps_the_small_files_and_the_teachers_hash_never_weights(tmp_path):
    out, kept = leaderboard_folder(tmp_path / "lb"), tmp_path / "record"
    assert record.save(out, kept) is None
    small = ["history.jsonl", "metrics.json", "run_config.json"]
    search_files = ["best.yaml", "study.db", "trials/000/history.jsonl", "tune.json"]
    assert files(kept) == sorted([*(f"runs/{row}/default/s0/{name}" for row in ("logits", "student") for name in small),
                                  "runs/teacher/metrics.json", "runs/teacher/model.safetensors.sha256",
                                  "plain/s0/history.jsonl", "plain/s0/metrics.json",
                                  *(f"tune/{row}/{name}" for row in ("logits", "student") for name in search_files)])
    assert (kept / "runs/teacher/model.safetensors.sha256").read_text() == hashlib.sha256(b"teacher weights").hexdigest() + "\n"
    with sqlite3.connect(kept / "tune/logits/study.db") as study:  # a working copy of the study
        assert study.execute("select number from trials").fetchall() == [(0,)]


def test_restore_brings_back_what_needs_no_teacher_and_the_rest_only_with_the_same_teacher(tmp_path):
    kept = tmp_path / "record"
    record.save(leaderboard_folder(tmp_path / "lb"), kept)
    fresh = tmp_path / "new-machine"
    restored, held_back, why = record.restore(kept, fresh)
    assert sorted(map(str, restored)) == ["plain/s0", "runs/student/default/s0", "tune/student"]
    assert held_back == 2 and "there is no teacher here yet" in why
    assert not (fresh / "runs" / "teacher").exists()  # the teacher is trained here again, never restored
    write(fresh / "runs" / "teacher" / "metrics.json")
    write(fresh / "runs" / "teacher" / "model.safetensors", "teacher weights")  # trained again: the same weights
    write(fresh / "runs" / "student" / "default" / "s0" / "metrics.json", '{"here": 1}')  # the local copy wins
    assert record.restore(kept, fresh, only=record.Path("tune/logits"))[0] == [record.Path("tune/logits")]
    restored, held_back, why = record.restore(kept, fresh)
    assert list(map(str, restored)) == ["runs/logits/default/s0"] and held_back == 0
    assert json.loads((fresh / "runs/student/default/s0/metrics.json").read_text()) == {"here": 1}
    assert (fresh / "tune/logits/study.db").is_file() and (fresh / "tune/logits/trials/000/history.jsonl").is_file()


def test_another_teacher_gets_nothing_of_the_record_and_adds_nothing_to_it(tmp_path):
    kept = tmp_path / "record"
    record.save(leaderboard_folder(tmp_path / "lb"), kept)
    before = {name: (kept / name).read_bytes() for name in files(kept)}
    other = leaderboard_folder(tmp_path / "other", weights="other weights")
    run(other / "runs" / "dkd" / "default" / "s0", teacher="t")
    (other / "runs" / "student" / "default" / "s0" / "metrics.json").write_text('{"other": 1}')
    note = record.save(other, kept)
    assert note.startswith(f"3 runs and searches of {other} not saved in {kept}: it holds the runs of another teacher")
    assert not (kept / "runs" / "dkd").exists()
    assert json.loads((kept / "runs/student/default/s0/metrics.json").read_text()) == {"other": 1}  # needs no teacher: the newer one
    assert all((kept / name).read_bytes() == data for name, data in before.items() if "student" not in name)
    fresh = tmp_path / "new-machine"
    write(fresh / "runs" / "teacher" / "metrics.json")
    write(fresh / "runs" / "teacher" / "model.safetensors", "other weights")
    restored, held_back, why = record.restore(kept, fresh)
    assert sorted(map(str, restored)) == ["plain/s0", "runs/student/default/s0", "tune/student"] and held_back == 2
    assert why.startswith("the teacher here is not the record's") and why.endswith("they train here again")
