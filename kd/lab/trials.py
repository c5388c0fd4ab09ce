"""One trial of a kd.tune search: the training it runs (its script and command line), and the runs
taken as trials instead of training a point from epoch 1: a finished run that trained the point
exactly as its trial would (reused), and a run a kill cut off (resumed from its checkpoint)."""

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from kd import cli
from kd.config import parse
from kd.util.files import existing_dir
from kd.lab.space import SUPERVISED, distribution, grid_points, held_points, inside, to_flags

NOT_IN_PRESET = ("seed", "max_train_samples", "max_eval_samples")  # the driver sets seeds; data sizes are the run's budget


def training_entry(method: str):
    """(parser, train(argv, on_epoch)) of the script that trains `method`; unguarded, so that a
    user error reaches this command's own one-line handler."""
    if method == SUPERVISED:
        return (cli.train_parser("student"),
                lambda argv, on_epoch: cli.train.__wrapped__("student", argv, on_epoch=on_epoch))
    return (cli.distill_parser(),
            lambda argv, on_epoch: cli.distill.__wrapped__(argv, on_epoch=on_epoch))


def trial_argv(method: str, training_args: List[str], values: Dict, run_dir: Path, resume: bool = False) -> List[str]:
    mode = ["--mode", method] if method != SUPERVISED else []
    # trackers off unless the flags ask for one; the sampled values come after the user's flags, so they win;
    # a trial never reads the test split (the search sees validation only, and so does whoever reads its folders)
    return ["--report-to", "none", *training_args, *mode, *to_flags(values), "--output-dir", str(run_dir),
            "--resume" if resume else "--overwrite", "--no-test-eval"]


def preset_of(run_dir: Path) -> Dict:
    """A finished run's hyperparameters as a --config preset: its resolved train (and distill)
    settings, without the seed and the data sizes."""
    resolved = json.loads((Path(run_dir) / "run_config.json").read_text())
    return {**{k: v for k, v in resolved["train"].items() if k not in NOT_IN_PRESET}, **(resolved.get("distill") or {})}


def trial_line(study, trial) -> str:
    values = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    if trial.state.name == "COMPLETE":
        return f"trial {trial.number}: {values} -> val f1_macro {trial.value:.4f} (best so far {study.best_value:.4f})"
    last = max(trial.intermediate_values, default=None)
    where = f" at epoch {last}, val f1_macro {trial.intermediate_values[last]:.4f}" if last else ""
    return f"trial {trial.number}: {values} -> {trial.state.name.lower()}{where}"


def changed_from_trial(folder: Path, method: str, training_args: List[str], point: Dict) -> str:
    """Why the run in `folder` (its run_config.json) did not train `point` exactly as a trial of
    this search would, or "" when it did."""
    from kd.train.device import choose_precision
    from kd.train.runner import changed_setting

    resolved = json.loads((folder / "run_config.json").read_text())
    parser, _ = training_entry(method)
    cfg, distill, run = parse(parser, trial_argv(method, training_args, point, folder))
    trial = {"train": dataclasses.asdict(cfg), "run": {"dataset": run.dataset}, "method": distill.mode if distill else "supervised",
             **({"distill": dataclasses.asdict(distill), "teacher": run.teacher} if distill else {"role": "student"})}
    changed = changed_setting(resolved, trial, may_change=())  # grad_accum too: it changes BatchNorm's batches
    # a trial trains in this process (or in each of accelerate's), with the precision picked here
    here = {"num_processes": int(os.environ.get("WORLD_SIZE", "1")), "mixed_precision": choose_precision(run.mixed_precision, warn=lambda line: None).mode}
    changed = changed or next(((key, resolved.get(key), value) for key, value in here.items() if resolved.get(key) != value), None)
    return f"it trained with {changed[0]}={changed[1]!r}, a trial of this search would with {changed[2]!r}" if changed else ""


def reusable_point(folder: Path, method: str, space: Dict[str, tuple], grid: Optional[Dict], training_args: List[str]) -> Tuple[Optional[Dict], str]:
    """(the point of the search that the finished run in `folder` trained, exactly as a trial would
    train it: every setting that changes what is learned, the batch split, the seed, the data set's
    name and sizes, the teacher, the process count and the precision), or (None, why it is not one)."""
    if not all((folder / name).is_file() for name in ("metrics.json", "run_config.json", "history.jsonl")):
        return None, "no finished run there"
    resolved = json.loads((folder / "run_config.json").read_text())
    settings = {**resolved["train"], **(resolved.get("distill") or {})}
    missing = [name for name in space if settings.get(name) is None]
    if missing:
        return None, f"it has no {missing[0]} setting (a run of another method?)"
    point = {name: settings[name] for name in space}
    shown = ", ".join(f"{name}={value}" for name, value in point.items())
    if grid is not None and point not in grid_points(grid):
        return None, f"its {shown} is not a point of the grid"
    if not all(inside(*space[name], value=value) for name, value in point.items()):
        return None, f"its {shown} is outside the declared space"
    changed = changed_from_trial(folder, method, training_args, point)
    return (None, changed) if changed else (point, "")


def reuse_runs(study, method: str, space: Dict[str, tuple], grid: Optional[Dict], training_args: List[str],
               folders: Sequence[Path], budget: int) -> None:
    """Take each finished run of `folders` that trained a point no trial holds yet, exactly as a
    trial would, as a finished trial of that point (its kept weights' validation F1, its per-epoch
    scores for the pruner), so that the point is not trained again; at most `budget` of them. The
    leaderboard's default run on the search's seed is its method's default point: a grid that
    holds the defaults costs a run less. Each folder left out is said so, in one line."""
    import optuna

    held = held_points(study)
    for folder in map(Path, folders):
        point, why = reusable_point(folder, method, space, grid, training_args)
        if point is not None and point in held:
            why = "a trial of this search holds its point already"
        elif point is not None and budget <= 0:
            why = "the trial budget is spent"
        if why:
            print(f"not reused: {folder}: {why}", flush=True)
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines() if line.strip()]
        study.add_trial(optuna.trial.create_trial(
            params=point, distributions={name: distribution(*spec) for name, spec in space.items()}, value=metrics["val"]["f1_macro"],
            intermediate_values={record["epoch"]: record["val_f1_macro"] for record in history if "val_f1_macro" in record},
            user_attrs={"run_dir": str(folder), "reused": True, "preset": preset_of(folder)}))
        held.append(point)
        budget -= 1
        print(trial_line(study, study.trials[-1]) + f" (reused: {folder})", flush=True)


def interrupted_run(study, method: str, training_args: List[str], values: Dict) -> Optional[Tuple[int, Path]]:
    """(number, folder) of the last interrupted trial of the point `values` whose folder holds a
    checkpoint of a run trained as a trial of this search would be, so that its point's new
    trial resumes it rather than starting again at epoch 1; None when there is none."""
    import optuna

    from kd.train.runner import CHECKPOINT

    for stale in reversed(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))):
        folder = Path(stale.user_attrs.get("run_dir", ""))
        if stale.params != values or existing_dir(folder / CHECKPOINT) is None or not (folder / "run_config.json").is_file():
            continue
        changed = changed_from_trial(folder, method, training_args, values)
        if changed:
            print(f"trial {stale.number} is not resumed: {changed}", file=sys.stderr, flush=True)
            continue
        return stale.number, folder
    return None


def resume_interrupted(trial, method: str, training_args: List[str], values: Dict, run_dir: Path) -> bool:
    """Move the folder of an interrupted trial of this point (if any) to `run_dir` and report its
    finished epochs' validation F1 to `trial`, for the pruner; True when there was one to resume."""
    from kd.train.checkpoint import STATE
    from kd.train.runner import CHECKPOINT

    found = interrupted_run(trial.study, method, training_args, values)
    if found is None:
        return False
    number, folder = found
    if folder.resolve() != run_dir.resolve():
        shutil.rmtree(run_dir, ignore_errors=True)  # a new trial's folder: anything there is another search's leftover
        shutil.move(str(folder), str(run_dir))
    # the epochs the run resumes after, as its checkpoint holds them (history.jsonl is written just
    # after the checkpoint: a kill between the two leaves it an epoch short)
    state = json.loads((existing_dir(run_dir / CHECKPOINT) / STATE).read_text())
    for record in state["history"]:
        if "val_f1_macro" in record:
            trial.report(record["val_f1_macro"], record["epoch"])
    trial.set_user_attr("resumed_from", number)
    print(f"trial {trial.number}: resumes interrupted trial {number} ({run_dir}) after epoch {state['epoch']}", flush=True)
    return True
