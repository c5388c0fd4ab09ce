"""kd.tune: a real Optuna study (SQLite in tmp_path) over real tiny training runs, resumed after
a simulated kill; the per-epoch hook of the runner; one-line errors for bad input; one search
over two accelerate processes (gloo), and two workers sharing one study (JournalStorage)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_port, read_json
from kd import cli
from kd.lab import space, study as studies, tune
from kd.config import build_parser, parse
from kd.distillers import DISTILLERS, Distiller

TUNE_FLAGS = ["--model", "cifar_resnet8", "--epochs", "1", "--batch-size", "32", "--val-size", "32", "--lr", "0.05"]


def run_tune(*args) -> subprocess.CompletedProcess:
    """`python -m kd.tune ...` as a user runs it; fails the test on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "kd.tune", *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def load_study(folder, method="supervised"):
    import optuna

    return optuna.load_study(study_name=method, storage=f"sqlite:///{folder / 'study.db'}")


def test_search_writes_preset_and_resumes_after_a_kill(tiny_dataset, tmp_path):
    out = tmp_path / "tune"
    first = run_tune("--method", "supervised", "--trials", "1", "--output-dir", out, "--dataset", tiny_dataset, *TUNE_FLAGS)
    assert "0 of 1 trials done, running 1" in first.stdout
    assert len(load_study(out).trials) == 1
    load_study(out).ask()  # a trial that was running when the search was killed: RUNNING forever in the database
    second = run_tune("--method", "supervised", "--trials", "2", "--output-dir", out, "--dataset", tiny_dataset, *TUNE_FLAGS)
    assert "trial 1 was interrupted" in second.stderr
    assert "1 of 2 trials done, running 1" in second.stdout  # continues the count; the killed trial is not counted
    trials = load_study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[0].params != trials[2].params  # the resumed sampler drew a new point
    for trial in (trials[0], trials[2]):
        run_dir = out / "trials" / f"{trial.number:03d}"
        assert trial.user_attrs["run_dir"] == str(run_dir)
        assert trial.value == read_json(run_dir / "metrics.json")["val"]["f1_macro"]  # the objective is validation F1
        assert trial.intermediate_values == {1: read_json(run_dir / "metrics.json")["val"]["f1_macro"]}  # reported per epoch
        assert read_json(run_dir / "run_config.json")["train"]["lr"] == trial.params["lr"]  # the sampled value trained
        assert trial.user_attrs["preset"] == tune.preset_of(run_dir)  # best.yaml's source, kept in the study
        assert "test" not in read_json(run_dir / "metrics.json")  # a trial never reads the test split...
        assert not (run_dir / "confusion_matrix.png").exists() and not (run_dir / "README.md").exists()  # ...nor shows it
    assert "; test not evaluated (--no-test-eval)" in first.stdout and "test (epoch" not in first.stdout
    best = max((trials[0], trials[2]), key=lambda t: t.value)
    summary = read_json(out / "tune.json")
    assert summary["trials"] == 2 and summary["best_trial"] == best.number and summary["best_params"] == best.params
    assert (out / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"best of supervised: trial {best.number}" in second.stdout
    # best.yaml is a preset that train_student.py takes: the best trial's values, the rest of its settings
    cfg, _, _ = parse(build_parser("train_student.py", "", cli.ROLES["student"]), ["--config", str(out / "best.yaml")])
    assert (cfg.lr, cfg.weight_decay, cfg.label_smoothing) == (best.params["lr"], best.params["weight_decay"], best.params["label_smoothing"])
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.val_size) == ("cifar_resnet8", 1, 32, 32)
    third = run_tune("--method", "supervised", "--trials", "2", "--output-dir", out, "--dataset", tiny_dataset, *TUNE_FLAGS)
    assert "running" not in third.stdout and len(load_study(out).trials) == 3  # budget reached: nothing trained


def test_grid_tries_each_point_in_order_and_resumes_an_interrupted_one(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "tune"
    grid = ["--grid", "lr=0.05,0.2", "label_smoothing=0,0.1"]
    first = run_tune("--method", "supervised", "--trials", "3", "--output-dir", out, *grid, "--dataset", tiny_dataset, *TUNE_FLAGS)
    assert "0 of 3 trials done, running 3 (grid: lr, label_smoothing)" in first.stdout
    points = [{"lr": 0.05, "label_smoothing": 0.0}, {"lr": 0.05, "label_smoothing": 0.1}, {"lr": 0.2, "label_smoothing": 0.0},
              {"lr": 0.2, "label_smoothing": 0.1}]
    trials = load_study(out).trials
    assert [t.params for t in trials[:3]] == points[:3]  # every combination, in order
    for trial in trials[:3]:  # the point trained, with the rest of the method's defaults
        resolved = read_json(out / "trials" / f"{trial.number:03d}" / "run_config.json")["train"]
        assert (resolved["lr"], resolved["label_smoothing"], resolved["weight_decay"]) == (trial.params["lr"], trial.params["label_smoothing"], 5e-4)
    load_study(out).ask()  # the last point was queued; a kill while it trained leaves it RUNNING
    second = run_tune("--method", "supervised", "--output-dir", out, *grid, "--dataset", tiny_dataset, *TUNE_FLAGS)
    assert "trial 3 was interrupted" in second.stderr and "3 of 4 trials done, running 1" in second.stdout
    trials = load_study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 + ["FAIL", "COMPLETE"]
    assert trials[4].params == points[3]  # the interrupted point is tried again, not a visited one
    assert read_json(out / "tune.json")["grid"] == {"lr": [0.05, 0.2], "label_smoothing": [0.0, 0.1]}
    with pytest.raises(SystemExit) as exit_info:  # another grid over the same study: one line, nothing trained
        tune.main(["--method", "supervised", "--output-dir", str(out), "--grid", "lr=0.1", "--dataset", str(tiny_dataset), *TUNE_FLAGS])
    assert exit_info.value.code == 2 and "resume with the same --grid" in capsys.readouterr().err
    assert len(load_study(out).trials) == 5


def kill_mid_trial(argv, trial_dir, epochs_done=2):
    """Start `python -m kd.tune ARGV` and SIGKILL it once its trial in `trial_dir` has finished
    `epochs_done` epochs (no handler runs: the trial stays RUNNING in the study and its run keeps
    its checkpoint); returns the killed run's history."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    search = subprocess.Popen([sys.executable, "-m", "kd.tune", *map(str, argv)], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = trial_dir / "history.jsonl"
    deadline = time.monotonic() + 300
    while not (history.is_file() and history.read_text().count("\n") >= epochs_done) and time.monotonic() < deadline:
        time.sleep(0.05)
    search.kill()
    assert search.wait() != 0, "the search ended before the kill; give it more epochs"
    assert not (trial_dir / "metrics.json").exists()
    return [json.loads(line) for line in history.read_text().splitlines()]


RESUME_ARGV = ["--method", "supervised", "--grid", "lr=0.05", *TUNE_FLAGS, "--epochs", "6"]
TPE_RESUME_ARGV = ["--method", "supervised", "--trials", "1", "--params", "lr", *TUNE_FLAGS, "--epochs", "6"]


@pytest.mark.parametrize("search", [RESUME_ARGV, TPE_RESUME_ARGV], ids=["grid", "tpe"])
def test_a_trial_cut_off_by_a_kill_resumes_from_its_checkpoint_not_from_epoch_1(search, tiny_dataset, tmp_path):
    """A grid's point or a TPE draw: the next trial tries the cut-off point again (a TPE search
    would otherwise draw another) and resumes its run from the checkpoint."""
    out = tmp_path / "tune"
    argv = [*search, "--output-dir", out, "--dataset", tiny_dataset]
    cut = kill_mid_trial(argv, out / "trials" / "000")
    saved = read_json(out / "trials" / "000" / "checkpoint" / "trainer_state.json")["epoch"]  # len(cut), or one more if killed between the two
    assert 2 <= len(cut) <= saved < 6
    second = run_tune(*argv)
    assert "trial 0 was interrupted" in second.stderr
    assert f"trial 1: resumes interrupted trial 0 ({out / 'trials' / '001'}) after epoch {saved}" in second.stdout
    trials = load_study(out).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] and trials[1].user_attrs["resumed_from"] == 0
    assert trials[1].params == trials[0].params
    resumed = [json.loads(line) for line in (out / "trials" / "001" / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed[:len(cut)] == cut  # the epochs before the kill were not trained again: their wall times are the killed run's
    assert sorted(trials[1].intermediate_values) == [1, 2, 3, 4, 5, 6]  # the pruner sees every epoch, the resumed ones too
    assert not (out / "trials" / "000").exists()  # moved, not copied: one folder per trained point
    assert read_json(out / "trials" / "001" / "metrics.json")["epochs"] == 6


def test_an_interrupted_trial_trained_otherwise_is_not_resumed_but_trained_again(tiny_dataset, tmp_path):
    out = tmp_path / "tune"
    argv = [*RESUME_ARGV, "--output-dir", out, "--dataset", tiny_dataset]
    killed = out / "trials" / "000"
    cut = kill_mid_trial(argv, killed)
    resolved = read_json(killed / "run_config.json")
    resolved["train"]["batch_size"] = 16  # as if this checkpoint were of a run at another batch size
    (killed / "run_config.json").write_text(json.dumps(resolved))
    second = run_tune(*argv)
    assert "trial 0 is not resumed: it trained with batch_size=16, a trial of this search would with 32" in second.stderr
    assert "resumes" not in second.stdout
    retrained = [json.loads(line) for line in (out / "trials" / "001" / "history.jsonl").read_text().splitlines()]
    assert len(retrained) == 6 and retrained[0]["epoch_time_s"] != cut[0]["epoch_time_s"]  # trained from epoch 1
    assert (killed / "checkpoint").is_dir()  # left where it was

REUSE_FLAGS = [*TUNE_FLAGS, "--epochs", "2"]


@pytest.fixture(scope="module")
def default_run(tiny_dataset, tmp_path_factory):
    """A finished student run at lr 0.05 (TUNE_FLAGS), seed 0: the point lr=0.05 of a search with the same flags."""
    out = tmp_path_factory.mktemp("reuse") / "default"
    cli.train("student", ["--dataset", str(tiny_dataset), *REUSE_FLAGS, "--report-to", "none", "--output-dir", str(out)])
    return out


def copy_as_if(run, folder, **changes):
    """`run`'s folder copied to `folder`, its run_config.json saying it trained otherwise: SECTION__KEY=value."""
    shutil.copytree(run, folder)
    resolved = read_json(run / "run_config.json")
    for name, value in changes.items():
        section, _, key = name.rpartition("__")
        (resolved[section] if section else resolved)[key] = value
    (folder / "run_config.json").write_text(json.dumps(resolved))
    return folder


def test_a_finished_run_of_a_point_is_taken_as_its_trial_not_trained_again(default_run, tiny_dataset, tmp_path):
    """The leaderboard's default run on the search's seed is its method's default point: kd.tune
    takes it as that point's trial. A trial of the same point, trained, scores the same bit for
    bit on CPU; a run that learned anything differently is not taken, and says why."""
    flags = ["--dataset", str(tiny_dataset), *REUSE_FLAGS]
    unlike = [copy_as_if(default_run, tmp_path / "seed1", train__seed=1), copy_as_if(default_run, tmp_path / "off-grid", train__lr=0.1),
              copy_as_if(default_run, tmp_path / "bf16", mixed_precision="bf16"), copy_as_if(default_run, tmp_path / "accum", train__grad_accum=2),
              copy_as_if(default_run, tmp_path / "two", num_processes=2), tmp_path / "missing"]
    out = tmp_path / "tune"
    result = run_tune("--method", "supervised", "--grid", "lr=0.05,0.2", "--output-dir", out, *flags, "--reuse-runs", default_run, *unlike)
    kept = read_json(default_run / "metrics.json")["val"]["f1_macro"]
    assert f"trial 0: lr=0.05 -> val f1_macro {kept:.4f} (best so far {kept:.4f}) (reused: {default_run})" in result.stdout
    whys = ["it trained with seed=1, a trial of this search would with 0", "its lr=0.1 is not a point of the grid",
            "it trained with mixed_precision='bf16', a trial of this search would with 'no'",
            "it trained with grad_accum=2, a trial of this search would with 1",  # the same global batch, other BatchNorm batches
            "it trained with num_processes=2, a trial of this search would with 1", "no finished run there"]
    for folder, why in zip(unlike, whys):
        assert f"not reused: {folder}: {why}\n" in result.stdout
    assert "1 of 2 trials done, running 1" in result.stdout  # only lr=0.2 is trained
    reused, trained = load_study(out).trials
    assert (reused.params, trained.params) == ({"lr": 0.05}, {"lr": 0.2})
    history = [json.loads(line) for line in (default_run / "history.jsonl").read_text().splitlines()]
    assert reused.value == kept and reused.intermediate_values == {r["epoch"]: r["val_f1_macro"] for r in history}  # the pruner's view
    assert reused.user_attrs["run_dir"] == str(default_run) and sorted(p.name for p in (out / "trials").iterdir()) == ["001"]
    assert read_json(out / "tune.json")["reused"] == 1 and read_json(out / "tune.json")["trials"] == 2
    # the same point trained as a trial: the same scores, epoch by epoch, so the search decides as if it had trained it
    alone = run_tune("--method", "supervised", "--grid", "lr=0.05", "--output-dir", tmp_path / "alone", *flags)
    assert "reused" not in alone.stdout
    (trial,) = load_study(tmp_path / "alone").trials
    assert (trial.value, trial.intermediate_values) == (reused.value, reused.intermediate_values)


def test_reused_runs_count_toward_the_budget_and_a_held_point_is_not_taken_twice(default_run, tiny_dataset, tmp_path, capsys):
    default_run = copy_as_if(default_run, tmp_path / "default")  # moved away below
    at_02 = copy_as_if(default_run, tmp_path / "lr0.2", train__lr=0.2)  # as if trained at the grid's other point
    search = ["--method", "supervised", "--grid", "lr=0.05,0.2", "--output-dir", str(tmp_path / "tune"), "--dataset", str(tiny_dataset), *REUSE_FLAGS]
    tune.main([*search, "--trials", "1", "--reuse-runs", str(default_run), str(at_02)])
    first = capsys.readouterr().out
    assert f"not reused: {at_02}: the trial budget is spent" in first and "running" not in first  # nothing trained
    tune.main([*search, "--trials", "2", "--reuse-runs", str(default_run), str(at_02)])
    second = capsys.readouterr().out
    assert f"not reused: {default_run}: a trial of this search holds its point already" in second and f"(reused: {at_02})" in second
    assert [t.params for t in load_study(tmp_path / "tune").trials] == [{"lr": 0.05}, {"lr": 0.2}] and not (tmp_path / "tune" / "trials").exists()
    best = (tmp_path / "tune" / "best.yaml").read_text()
    assert "trial 0," in best and "lr: 0.05\n" in best  # the two score the same: the first is the best
    shutil.move(default_run, tmp_path / "moved")  # the reused trials' folders lie outside the search: best.yaml needs neither
    shutil.move(at_02, tmp_path / "moved-too")
    (tmp_path / "tune" / "best.yaml").unlink()
    tune.main([*search, "--trials", "2", "--reuse-runs", str(default_run)])  # the budget is reached: nothing to take
    assert "reused:" not in capsys.readouterr().out  # neither "(reused: ..." nor "not reused: ..."
    assert (tmp_path / "tune" / "best.yaml").read_text() == best


def test_an_older_study_makes_best_yaml_from_the_folder_or_tune_json_else_one_line(tmp_path):
    """A study from before trials kept their preset: best.yaml comes from the best trial's folder,
    or, where that is gone, from the tune.json of a search that already ended with that trial."""
    import optuna

    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.1}, distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1)},
                                              value=0.5, user_attrs={"run_dir": str(tmp_path / "run")}))
    resolved = {"train": {"lr": 0.1, "seed": 3, "max_train_samples": 64}, "distill": {"temperature": 2.0}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.json").write_text(json.dumps(resolved))
    assert tune.write_preset(study, "logits", tmp_path / "best.yaml") == {"lr": 0.1, "temperature": 2.0}
    shutil.rmtree(tmp_path / "run")
    (tmp_path / "tune.json").write_text(json.dumps({"best_trial": 0, "preset": {"lr": 0.1, "temperature": 2.0}}))
    assert tune.write_preset(study, "logits", tmp_path / "best.yaml") == {"lr": 0.1, "temperature": 2.0}
    (tmp_path / "tune.json").write_text(json.dumps({"best_trial": 7, "preset": {"lr": 0.2}}))  # another trial's
    (tmp_path / "best.yaml").unlink()
    line = (f"best.yaml is made from the best trial's run_config.json, and {tmp_path / 'run'} (trial 0) "
            "no longer has one: put the folder back, or search again in a new --output-dir")
    with pytest.raises(tune.UsageError, match=f"^{re.escape(line)}$"):
        tune.write_preset(study, "logits", tmp_path / "best.yaml")
    assert not (tmp_path / "best.yaml").exists()


def test_a_distillation_run_is_reused_only_with_its_teacher_and_switches(tiny_dataset, tiny_teacher, tmp_path, capsys):
    flags = ["--dataset", str(tiny_dataset), *REUSE_FLAGS, "--teacher", str(tiny_teacher)]
    run = tmp_path / "logits"
    cli.distill([*flags, "--mode", "logits", "--report-to", "none", "--output-dir", str(run)])  # T 4, the grid's first point
    other_teacher = copy_as_if(run, tmp_path / "other-teacher", teacher=str(tmp_path / "elsewhere"))
    standardised = copy_as_if(run, tmp_path / "ls", distill__logit_standardization=True)  # the leaderboard's logits-ls row
    tune.main(["--method", "logits", "--grid", "temperature=4,8", "--trials", "1", "--output-dir", str(tmp_path / "tune"), *flags,
               "--reuse-runs", str(other_teacher), str(standardised), str(run)])
    out = capsys.readouterr().out
    assert f"not reused: {other_teacher}: it trained with teacher='{tmp_path / 'elsewhere'}', a trial of this search would with '{tiny_teacher}'" in out
    assert f"not reused: {standardised}: it trained with logit_standardization=True, a trial of this search would with False" in out
    assert f"(reused: {run})" in out and "running" not in out
    assert load_study(tmp_path / "tune", "logits").trials[0].params == {"temperature": 4.0}


def test_epoch_callback_sees_each_record_and_can_stop_the_run(tiny_dataset, tmp_path):
    class Stop(Exception):
        pass

    seen = []

    def on_epoch(record):
        seen.append(record)
        raise Stop

    out = tmp_path / "run"
    argv = ["--dataset", str(tiny_dataset), *TUNE_FLAGS, "--epochs", "3", "--report-to", "none", "--output-dir", str(out)]
    with pytest.raises(Stop):
        cli.train("student", argv, on_epoch=on_epoch)
    assert [r["epoch"] for r in seen] == [1] and "val_f1_macro" in seen[0]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history == [json.loads(json.dumps(seen[0]))]  # called after the epoch was saved
    assert (out / "checkpoint").is_dir() and not (out / "metrics.json").exists()  # stopped there, resumable


class NoSpace(Distiller):
    pass


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope", "--trials", "2"], "unknown method 'nope'"),
    (["--method", "nope"], "unknown method 'nope'"),  # before the missing budget: fix the name first
    (["--method", "no-space", "--grid", "lr=0.1"], "the search space of no-space is empty"),
    (["--method", "logits", "--trials", "0"], "--trials must be positive"),
    (["--method", "no-space", "--trials", "2"], "the search space of no-space is empty"),
    (["--method", "logits", "--trials", "2", "--params", "lr"], "--params 'lr' is not in the search space of logits"),
    (["--method", "supervised", "--trials", "2", "--val-size", "0"], "--val-size must be > 0"),
    (["--method", "logits"], "give --trials (the search's budget) or --grid"),
    (["--method", "dkd", "--grid", "dkd_beta=32"], "--grid dkd_beta=32 is outside the declared space of dkd (1.0 to 16.0)"),
    (["--method", "dkd", "--grid", "lr=0.1"], "--grid 'lr' is not in the search space of dkd"),
    (["--method", "dkd", "--grid", "dkd_beta"], "--grid wants NAME=V1,V2,..."),
    (["--method", "dkd", "--grid", "dkd_beta=two"], "--grid dkd_beta=two: want a number"),
    (["--method", "supervised", "--grid", "lr=0.1", "--trials", "2"], "--trials 2 is more than the grid's 1 points"),
    (["--method", "dkd", "--grid", "dkd_beta=2", "--params", "dkd_beta"], "leave out --params"),
    (["--method", "logits", "--trials", "2", "--push-to-hub", "me/model"], "kd.tune's trials are not published: drop --push-to-hub"),
    (["--method", "logits", "--trials", "2", "--logit-standardization"],
     "with --logit-standardization, logits trains with ls_temperature in place of temperature: a search over temperature would change nothing"),
    (["--method", "dist", "--grid", "dist_beta=1,2", "temperature=2,4", "--logit-standardization"], "dist trains with ls_temperature in place of temperature"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(DISTILLERS, "no-space", NoSpace)
    with pytest.raises(SystemExit) as exit_info:
        tune.main([*argv, "--output-dir", str(tmp_path / "tune")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "tune").exists()  # nothing created


def test_every_method_declares_a_valid_space_and_grid():
    for method in space.methods():
        declared = space.search_space(method)  # raises on a malformed entry or an empty space
        assert declared, method
        grid = space.declared_grid(method)  # raises on a point outside the space
        assert len(space.grid_points(grid)) >= 2, method  # a grid of one point tunes nothing


def test_a_resumed_grid_queues_each_point_once(tmp_path):
    """A killed grid search resumed twice: the point that was running is queued again, the points
    still queued are not queued twice (a second copy would run in place of a point never trained)."""
    import optuna

    study = optuna.create_study(study_name="dkd", storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    grid = {"dkd_beta": [1.0, 2.0, 4.0]}
    space.enqueue_grid(study, grid)
    running = study.ask()  # the first queued point starts, then the search is killed
    study.tell(running.number, state=optuna.trial.TrialState.FAIL)  # as open_study marks it on resume
    space.enqueue_grid(study, grid)
    space.enqueue_grid(study, grid)
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert [trial.system_attrs["fixed_params"] for trial in waiting] == [{"dkd_beta": 2.0}, {"dkd_beta": 4.0}, {"dkd_beta": 1.0}]
    assert sorted(point["dkd_beta"] for point in space.held_points(study)) == [1.0, 2.0, 4.0]


def test_a_resumed_tpe_search_queues_a_cut_off_draw_and_says_so_only_for_a_drawn_one(tmp_path, capsys):
    """Two trials a kill left RUNNING: one had drawn its point, one was killed before it drew any.
    On resume both are marked failed; only the drawn point is queued, and only its line says the
    point is tried again."""
    import optuna

    study = optuna.create_study(study_name="logits", storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    drawn = study.ask()
    drawn.suggest_float("temperature", 1.0, 8.0, log=True)
    undrawn = study.ask()
    tune.open_study(tmp_path, "logits", sampler_seed=0, prune_from_epoch=1, training_args=[])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trial ")]  # not Optuna's own log
    marked = "was interrupted; marked failed (it does not count toward --trials)"
    assert lines == [f"trial {drawn.number} {marked}, its point is tried again", f"trial {undrawn.number} {marked}, it had drawn no point yet"]
    study = load_study(tmp_path, "logits")
    assert [trial.state for trial in study.trials[:2]] == [optuna.trial.TrialState.FAIL] * 2
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert [trial.system_attrs["fixed_params"] for trial in waiting] == [{"temperature": drawn.params["temperature"]}]


def refused(capsys, argv):
    """kd.tune's one error line for `argv` (exit 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        tune.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_search_of_tpe_draws_does_not_resume_a_grid(tmp_path, capsys):
    import optuna

    out = tmp_path / "tune"
    out.mkdir()
    study = optuna.create_study(study_name="supervised", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    study.set_user_attr("grid", {"lr": [0.1, 0.2]})
    study.enqueue_trial({"lr": 0.2})  # the grid's second point, still queued
    line = refused(capsys, ["--method", "supervised", "--trials", "3", "--output-dir", str(out), "--dataset", "d"])
    assert "holds a --grid search; resume it with its --grid, or give a search of TPE draws another --output-dir" in line
    study = optuna.load_study(study_name="supervised", storage=f"sqlite:///{out / 'study.db'}")
    assert [trial.state.name for trial in study.trials] == ["WAITING"]  # nothing ran


def test_a_grid_does_not_resume_a_search_of_tpe_draws(tmp_path, capsys):
    import optuna

    out = tmp_path / "tune"
    out.mkdir()
    study = optuna.create_study(study_name="supervised", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    lr = optuna.distributions.FloatDistribution(0.05, 1.0, log=True)
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.3}, distributions={"lr": lr}, value=0.5))  # one TPE draw, finished
    line = refused(capsys, ["--method", "supervised", "--grid", "lr=0.1,0.2", "--output-dir", str(out), "--dataset", "d"])
    assert "holds a search of TPE draws; a --grid search needs another --output-dir" in line
    study = optuna.load_study(study_name="supervised", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 1 and study.user_attrs == {}  # nothing queued or recorded


def test_declared_grid_outside_the_space_is_one_line(monkeypatch):
    class BadGrid(Distiller):
        search_space = {"temperature": ("float", 1.0, 8.0)}
        search_grid = {"temperature": (2.0, 16.0)}

    monkeypatch.setitem(DISTILLERS, "bad-grid", BadGrid)
    with pytest.raises(space.UsageError, match=r"^bad-grid.search_grid \(kd/distillers/\): --grid temperature=16.0 is outside the declared space"):
        space.declared_grid("bad-grid")


def test_error_inside_a_trial_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--method", "logits", "--trials", "1", "--output-dir", str(tmp_path / "tune"), "--teacher", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing" in err[0], err
    import optuna

    study = optuna.load_study(study_name="logits", storage=f"sqlite:///{tmp_path / 'tune' / 'study.db'}")
    assert [trial.state.name for trial in study.trials] == ["FAIL"]  # recorded, and not counted toward --trials


def launch_tune(*args, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N -m kd.tune ...` on CPU (gloo), as docs/tuning.md says."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "kd.tune", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_one_search_trains_every_trial_on_all_launched_processes(tiny_dataset, tmp_path):
    """The first process owns the study and hands each trial's point to the other; both train it
    (DDP). The process group lives over the trials: the second trial's collectives used to find
    it destroyed by the first trial's end_training."""
    out = tmp_path / "tune"
    result = launch_tune("--method", "supervised", "--grid", "lr=0.05,0.2", "--output-dir", out, "--dataset", tiny_dataset, *TUNE_FLAGS)
    assert result.stdout.count("tune supervised: 0 of 2 trials done, running 2 (grid: lr)") == 1  # one process speaks for the search
    trials = load_study(out).trials
    assert [(t.state.name, t.params) for t in trials] == [("COMPLETE", {"lr": 0.05}), ("COMPLETE", {"lr": 0.2})]
    for trial in trials:
        run_dir = out / "trials" / f"{trial.number:03d}"
        resolved = read_json(run_dir / "run_config.json")
        assert resolved["num_processes"] == 2 and resolved["train"]["lr"] == trial.params["lr"]  # both processes trained this point
        assert trial.value == read_json(run_dir / "metrics.json")["val"]["f1_macro"]
        assert result.stdout.count(f"trial {trial.number}: lr=") == 1
    assert result.stdout.count("| 2 processes |") == 2  # each trial's start line
    assert read_json(out / "tune.json")["trials"] == 2 and sorted(p.name for p in (out / "trials").iterdir()) == ["000", "001"]


def test_a_trial_pruned_under_two_processes_stops_both_and_the_search_goes_on(tiny_dataset, tmp_path):
    """The first process decides from the validation score gathered over both; both stop after
    that epoch and leave the trial together (a process left training would hang the other)."""
    import optuna

    out = tmp_path / "tune"
    out.mkdir()
    study = optuna.create_study(study_name="supervised", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    grid = {"lr": [0.05, 0.1, 0.2, 0.4]}
    study.set_user_attr("grid", grid)
    lr = space.distribution(*space.search_space("supervised")["lr"])
    for value in grid["lr"][1:]:  # three trials that scored 1.0 from epoch 1 on (as --reuse-runs adds them): the median to beat
        study.add_trial(optuna.trial.create_trial(params={"lr": value}, distributions={"lr": lr}, value=1.0, intermediate_values={1: 1.0, 2: 1.0},
                                                  user_attrs={"run_dir": str(tmp_path / "elsewhere"), "preset": {"lr": value}}))
    result = launch_tune("--method", "supervised", "--grid", "lr=0.05,0.1,0.2,0.4", "--prune-from-epoch", "1", "--output-dir", out,
                         "--dataset", tiny_dataset, *TUNE_FLAGS, "--epochs", "2")
    pruned = load_study(out).trials[3]
    assert pruned.state.name == "PRUNED" and pruned.params == {"lr": 0.05} and list(pruned.intermediate_values) == [1]
    assert f"trial 3: lr=0.05 -> pruned at epoch 1, val f1_macro {pruned.intermediate_values[1]:.4f}" in result.stdout
    history = [json.loads(line) for line in (out / "trials" / "003" / "history.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in history] == [1]
    assert read_json(out / "tune.json")["pruned"] == 1  # both processes left the trial and the search ended


def start_worker(argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kd.tune", *map(str, argv)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_workers_share_one_study_and_run_each_grid_point_once(tiny_dataset, tmp_path, capsys):
    """Two `python -m kd.tune --storage journal` on one folder, as on two GPUs: held at the study's
    lock until both have started, then let go at once. Together they run the grid's four points,
    each once; the last to finish writes tune.json."""
    import fcntl

    import optuna

    out = tmp_path / "tune"
    out.mkdir()
    argv = ["--method", "supervised", "--grid", "lr=0.05,0.1,0.2,0.4", "--storage", "journal", "--output-dir", out,
            "--dataset", tiny_dataset, *TUNE_FLAGS]
    turn = open(out / "study.lock", "a")
    fcntl.flock(turn, fcntl.LOCK_EX)
    workers = [start_worker(argv) for _ in range(2)]
    deadline = time.monotonic() + 300
    while len(list((out / "workers").glob("*.lock"))) < 2 and time.monotonic() < deadline and all(w.poll() is None for w in workers):
        time.sleep(0.05)
    turn.close()  # both wait for the turn to create the study
    outputs = [worker.communicate(timeout=600) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    trials = optuna.load_study(study_name="supervised", storage=storage).trials
    assert sorted(t.params["lr"] for t in trials) == [0.05, 0.1, 0.2, 0.4] and {t.state.name for t in trials} == {"COMPLETE"}
    reported = sorted(line.split(":")[0] for stdout, _ in outputs for line in stdout.splitlines() if re.match(r"trial \d+: lr=", line))
    assert reported == [f"trial {number}" for number in range(4)]  # each trial run and reported by one worker
    assert read_json(out / "tune.json")["trials"] == 4 and not (out / "study.db").exists()
    assert not list((out / "workers").glob("*.lock"))  # each worker took its file away
    line = refused(capsys, [*map(str, argv[:4]), "--output-dir", str(out), "--dataset", "d"])  # resumed without --storage journal
    assert f"{out} keeps its study in study.journal: resume with --storage journal" in line


def test_a_running_trial_is_failed_only_once_its_worker_is_gone(tmp_path):
    """A worker that holds its lock file runs its trial still; one killed (its file left, the
    lock released) cut its trial off: marked failed, its point queued again."""
    import optuna

    study = optuna.create_study(study_name="logits", storage=studies.storage_of(tmp_path, "journal"), direction="maximize")
    live, killed = studies.Worker(tmp_path), studies.Worker(tmp_path)
    killed.file.close()  # what a kill leaves: the file, no lock
    trials = {}
    for name, worker in (("live", live), ("killed", killed)):
        trials[name] = study.ask()
        trials[name].suggest_float("temperature", 1.0, 8.0, log=True)
        trials[name].set_user_attr("worker", worker.name)
    studies.fail_cut_off(study, tmp_path, grid=None)
    states = {name: study.trials[trial.number].state.name for name, trial in trials.items()}
    assert states == {"live": "RUNNING", "killed": "FAIL"}
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert [trial.system_attrs["fixed_params"] for trial in waiting] == [trials["killed"].params]
    assert sorted(path.stem for path in (tmp_path / "workers").iterdir()) == [live.name]  # the killed worker's file is cleared
    live.close()


def test_a_second_worker_on_sqlite_is_refused(tmp_path, capsys):
    """study.db takes one writer: a worker that finds another alive says how to share the study."""
    out = tmp_path / "tune"
    out.mkdir()
    other = studies.Worker(out)
    line = refused(capsys, ["--method", "supervised", "--trials", "2", "--output-dir", str(out), "--dataset", "d"])
    assert f"another kd.tune worker searches {out}, whose study.db (SQLite) takes one writer: start every worker with --storage journal" in line
    other.close()
    assert not (out / "study.db").exists()
