"""Search one method's hyperparameters on the validation split (never on test).

    python -m kd.tune --method logits --trials 20 --output-dir outputs/tune-logits \\
        --teacher outputs/teacher --config presets/cpu-thin-student.yaml --dataset PATH

Every flag it does not know goes to the training script (train_student.py for `supervised`,
distill.py otherwise). The space searched is the method's own `search_space` (kd.distillers).
Each trial is a real training run in OUTPUT_DIR/trials/; the objective is the validation macro
F1 of the kept weights, and a trial whose per-epoch validation F1 falls below the median of
earlier trials at that epoch is pruned (Optuna: seeded TPE sampler, median pruner). `--grid
NAME=V1,V2 ...` tries those points instead, in order (each inside the declared space): on a
budget of a few trials a small grid says more than a few random draws. `--reuse-runs RUN_DIR
...` takes finished runs that trained a point of the search exactly as its trial would (the
leaderboard's default run on the search's seed) as that point's trial, instead of training it
again. The study lives in OUTPUT_DIR/study.db (SQLite): run the same command again and it
continues to the trial budget; a trial a kill cut off is marked failed, its point (a grid's or
a TPE draw) is tried again, and that trial resumes the cut-off run from its last checkpoint.
Writes OUTPUT_DIR/best.yaml (a preset for --config), trials.png and tune.json."""

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from kd.config import Parser, TrainConfig, parse
from kd.distillers import DISTILLERS
from kd.errors import RunError, UsageError, main_guard
from kd.export import write_json_atomic, write_text_atomic
from kd.plots import plot_trials
from kd.space import SUPERVISED, enqueue_grid, grid_points, methods, parse_grid, search_space, suggest
from kd.trials import preset_of, resume_interrupted, reuse_runs, training_entry, trial_argv, trial_line

PRUNE_STARTUP_TRIALS = 3  # trials that always finish before the median means anything


def check_training_args(method: str, training_args: List[str], searched: Sequence[str] = ()) -> TrainConfig:
    """Parse the training flags once, before any trial: a wrong flag, or a searched setting
    that the flags make do nothing, fails now, in one line."""
    parser, _ = training_entry(method)
    cfg, distill, run = parse(parser, training_args + (["--mode", method] if method != SUPERVISED else []))
    replaced = DISTILLERS[method].standardized_by if distill is not None and distill.logit_standardization else {}
    idle = next((name for name in searched if name in replaced), None)
    if idle:
        raise UsageError(f"with --logit-standardization, {method} trains with {' and '.join(replaced[idle])} in place of {idle}: "
                         f"a search over {idle} would change nothing; leave out --logit-standardization or {idle}")
    if cfg.val_size <= 0:
        raise UsageError("kd.tune selects on the validation split: --val-size must be > 0")
    if run.push_to_hub:
        raise UsageError("kd.tune's trials are not published: drop --push-to-hub (push the tuned run instead)")
    return cfg


def make_objective(method: str, space: Dict[str, tuple], training_args: List[str], out: Path, epochs: int):
    import optuna

    _, train = training_entry(method)

    def on_epoch_for(trial):
        def on_epoch(record: Dict) -> None:
            if "val_f1_macro" not in record:
                raise UsageError("kd.tune needs validation metrics every epoch (--val-size > 0)")
            trial.report(record["val_f1_macro"], record["epoch"])
            if record["epoch"] < epochs and trial.should_prune():  # a trial at its last epoch has spent its budget: keep it
                raise optuna.TrialPruned(f"val f1_macro {record['val_f1_macro']:.4f} at epoch {record['epoch']}, below the median")
        return on_epoch

    def objective(trial) -> float:
        values = suggest(trial, space)
        run_dir = out / "trials" / f"{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        resume = resume_interrupted(trial, method, training_args, values, run_dir)
        try:
            metrics = train(trial_argv(method, training_args, values, run_dir, resume), on_epoch_for(trial))
        except RunError as error:  # a diverging setting (non-finite loss) is a result, not a crash: prune it
            raise optuna.TrialPruned(str(error)) from error
        trial.set_user_attr("preset", preset_of(run_dir))
        return metrics["val"]["f1_macro"]  # the kept weights' validation score; test is never read

    return objective


def open_study(out: Path, method: str, sampler_seed: int, prune_from_epoch: int, training_args: List[str], grid: Optional[Dict] = None):
    """The study of `out`, created or loaded; trials a killed search left running are marked failed."""
    import optuna

    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    others = [name for name in optuna.get_all_study_names(storage) if name != method]
    if others:
        raise UsageError(f"{out} holds a search for {others[0]!r}; use another --output-dir for {method!r}")
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP_TRIALS, n_warmup_steps=prune_from_epoch)
    study = optuna.create_study(study_name=method, storage=storage, direction="maximize", pruner=pruner, load_if_exists=True)
    if grid is not None and "grid" not in study.user_attrs and finished(study):  # queued points would mix with its draws
        raise UsageError(f"{out} holds a search of TPE draws; a --grid search needs another --output-dir")
    if grid is None and "grid" in study.user_attrs:  # its queued points would run before any draw, and tune.json would say grid
        raise UsageError(f"{out} holds a --grid search; resume it with its --grid, or give a search of TPE draws another --output-dir")
    saved = study.user_attrs.get("training_args")
    if saved is not None and saved != training_args:
        raise UsageError(f"{out} was searched with training flags {' '.join(saved)}; resume with the same flags or use another --output-dir")
    study.set_user_attr("training_args", training_args)
    if grid is not None:
        if study.user_attrs.get("grid", grid) != grid:
            raise UsageError(f"{out} was searched on the grid {study.user_attrs['grid']}; resume with the same --grid or use another --output-dir")
        study.set_user_attr("grid", grid)
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
        if grid is None and stale.params:  # a TPE draw is tried again, not dropped for a new one (enqueue_grid queues a grid's)
            study.enqueue_trial(stale.params)
        again = "its point is tried again" if grid is not None or stale.params else "it had drawn no point yet"  # killed before suggest
        print(f"trial {stale.number} was interrupted; marked failed (it does not count toward --trials), {again}", file=sys.stderr)
    # reseeded by the history's length: a resumed search draws new points, still reproducibly
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed + len(study.trials), n_startup_trials=PRUNE_STARTUP_TRIALS)
    return study


def finished(study) -> List:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def write_preset(study, method: str, path: Path) -> Dict:
    """The best trial's preset (`preset_of` its folder), which the study keeps beside the trial,
    so that best.yaml does not need the folder (a reused trial's lies outside the search)."""
    import yaml

    best = study.best_trial
    preset, folder = best.user_attrs.get("preset"), Path(best.user_attrs["run_dir"])
    if preset is None and (folder / "run_config.json").is_file():  # a study from before the preset was kept
        preset = preset_of(folder)
    elif preset is None:  # ... whose folder is gone: the summary of a search that already ended with this trial
        summary = path.with_name("tune.json")
        ended = json.loads(summary.read_text()) if summary.is_file() else {}
        if ended.get("best_trial") != best.number:
            raise UsageError(f"best.yaml is made from the best trial's run_config.json, and {folder} (trial {best.number}) "
                             "no longer has one: put the folder back, or search again in a new --output-dir")
        preset = ended["preset"]
    header = (f"# kd.tune: best of {len(finished(study))} trials for {method}, trial {best.number}, "
              f"validation macro F1 {best.value:.4f}\n# searched: {', '.join(best.params)}\n")
    write_text_atomic(path, header + yaml.safe_dump(preset, sort_keys=False))
    return preset


def build_parser() -> Parser:
    parser = Parser(prog="python -m kd.tune", description=__doc__.splitlines()[0], allow_abbrev=False,
                    epilog="Every other flag is passed to the training script of the method.")
    parser.add_argument("--method", required=True, help=f"what to tune: {', '.join(methods())}")
    parser.add_argument("--trials", type=int, help="trial budget of the search (finished + pruned trials, over all resumes); with --grid: its size")
    parser.add_argument("--output-dir", required=True, help="the search folder: study.db, trials/, best.yaml, trials.png")
    parser.add_argument("--params", nargs="+", help="search only these names of the method's space")
    parser.add_argument("--grid", nargs="+", metavar="NAME=V1,V2", help="try these points (every combination, in order) instead of TPE draws")
    parser.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (the trials' training seed is --seed)")
    parser.add_argument("--prune-from-epoch", type=int, default=2, help="first epoch at which a trial may be pruned")
    parser.add_argument("--reuse-runs", nargs="+", default=[], metavar="RUN_DIR",
                        help="finished runs of this method trained as a trial would be (same flags, a point of the search): "
                             "each counts as that point's trial instead of training it again")
    return parser


@main_guard
def tune(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run (or continue) the search; returns tune.json's content."""
    args, training_args = build_parser().parse_known_args(argv)
    search_space(args.method)  # an unknown method or an empty space is the first thing to say
    grid = parse_grid(args.method, args.grid) if args.grid else None
    if grid is not None and args.params:
        raise UsageError("--grid names the parameters it searches: leave out --params")
    size = len(grid_points(grid)) if grid is not None else None
    trials = args.trials if args.trials is not None else size
    if trials is None:
        raise UsageError("give --trials (the search's budget) or --grid")
    if trials <= 0:
        raise UsageError(f"--trials must be positive, got {trials}")
    if size is not None and trials > size:
        raise UsageError(f"--trials {trials} is more than the grid's {size} points")
    space = search_space(args.method, list(grid) if grid else args.params)
    epochs = check_training_args(args.method, training_args, list(space)).epochs
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial; a failing trial ends in one error line, no traceback
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(out, args.method, args.sampler_seed, args.prune_from_epoch, training_args, grid)
    if args.reuse_runs and len(finished(study)) < trials:
        reuse_runs(study, args.method, space, grid, training_args, args.reuse_runs, budget=trials - len(finished(study)))
    remaining = trials - len(finished(study))
    if remaining > 0:
        if grid is not None:
            enqueue_grid(study, grid)
        print(f"tune {args.method}: {len(finished(study))} of {trials} trials done, running {remaining} "
              f"({'grid' if grid else 'space'}: {', '.join(space)})")
        study.optimize(make_objective(args.method, space, training_args, out, epochs), n_trials=remaining,
                       callbacks=[lambda study, trial: print(trial_line(study, trial), flush=True)])
    return summarize(study, args.method, out)


def summarize(study, method: str, out: Path) -> Dict:
    done = finished(study)
    if not any(trial.state.name == "COMPLETE" for trial in done):
        raise RunError(f"no trial of {method} finished (all {len(done)} pruned); nothing to write")
    preset = write_preset(study, method, out / "best.yaml")
    plot_trials(finished(study), study.study_name, out / "trials.png")
    best = study.best_trial
    summary = {"method": method, "trials": len(done), "pruned": sum(t.state.name == "PRUNED" for t in done),
               "best_trial": best.number, "best_val_f1_macro": best.value, "best_params": best.params, "preset": preset,
               "reused": sum(bool(t.user_attrs.get("reused")) for t in done),  # runs taken as trials, not trained by the search
               "grid": study.user_attrs.get("grid")}  # None: TPE draws
    write_json_atomic(out / "tune.json", summary)
    print(f"best of {method}: trial {best.number}, val f1_macro {best.value:.4f}, "
          + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
          + f" | {summary['trials']} trials, {summary['pruned']} pruned | wrote {out / 'best.yaml'}, {out / 'trials.png'}")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:  # None: the console script exits 0
    tune(argv)


if __name__ == "__main__":
    main()
