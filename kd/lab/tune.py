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
Writes OUTPUT_DIR/best.yaml (a preset for --config), trials.png and tune.json.

Under `accelerate launch --num_processes N -m kd.tune ...` it is one search whose every trial
trains on the N processes: the first owns the study and hands each point (and each pruning
decision) to the others. Several workers (`python -m kd.tune ... --storage journal`, each on
its own GPU) share one study instead: see kd.lab.study and docs/tuning.md."""

import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from kd.config import Parser, TrainConfig, parse
from kd.distillers import DISTILLERS
from kd.errors import RunError, UsageError, main_guard
from kd.util.files import write_json_atomic, write_text_atomic
from kd.train.plots import plot_trials
from kd.lab.space import SUPERVISED, grid_points, methods, parse_grid, search_space, suggest
from kd.lab.study import TakeTurns, Worker, check_storage, finished, next_trial, open_study, others_alive, running
from kd.lab.trials import preset_of, resume_interrupted, reuse_runs, training_entry, trial_argv, trial_line


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


class Processes:
    """The processes that train each trial: this one, or the N that `accelerate launch` started
    (WORLD_SIZE). The first owns the study (opens it, draws, reports, tells); the others follow
    what it decides, so that all train the same point and stop together."""

    def __init__(self):
        self.count = int(os.environ.get("WORLD_SIZE", "1"))
        self.state = None
        if self.count > 1:
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            # the process group lives over the whole search: kd.train.runner leaves a group it did not start
            self.state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() would start it
        self.main = self.state is None or self.state.is_main_process

    def decide(self, work: Callable):
        """`work()`, run by the first process; its result (or its UsageError) on every process."""
        result, error = None, None
        if self.main:
            try:
                result = work()
            except UsageError as caught:
                error = caught
        if self.state is not None:
            from accelerate.utils import broadcast_object_list

            result, error = broadcast_object_list([result, error], from_process=0)
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        if self.state is not None:
            self.state.destroy_process_group()


class Search:
    """The first process's side of a search: the study, this worker, the trial it runs."""

    def __init__(self, args, out: Path, space: Dict[str, tuple], grid: Optional[Dict], budget: int, training_args: List[str]):
        self.args, self.out, self.space, self.grid, self.budget, self.training_args = args, out, space, grid, budget, training_args
        out.mkdir(parents=True, exist_ok=True)
        self.worker = Worker(out)
        try:
            self.open()
        except BaseException:
            self.worker.close()
            raise

    def open(self) -> None:
        """Create or load the study, take the runs given as trials, and say what is left to run."""
        args, out, space, grid, budget, training_args = self.args, self.out, self.space, self.grid, self.budget, self.training_args
        with TakeTurns(out):
            if args.storage == "sqlite" and others_alive(out, self.worker.name):
                raise UsageError(f"another kd.tune worker searches {out}, whose study.db (SQLite) takes one writer: "
                                 "start every worker with --storage journal (one machine, a shared file system) or a database URL")
            self.study = open_study(out, args.method, args.sampler_seed, args.prune_from_epoch, training_args, grid, args.storage)
            if args.reuse_runs and len(finished(self.study)) < budget:
                reuse_runs(self.study, args.method, space, grid, training_args, args.reuse_runs, budget=budget - len(finished(self.study)))
            done, others = len(finished(self.study)), len(running(self.study))
        remaining = budget - done - others
        if remaining > 0:
            elsewhere = f", {others} running in other workers" if others else ""
            print(f"tune {args.method}: {done} of {budget} trials done{elsewhere}, running {remaining} "
                  f"({'grid' if grid else 'space'}: {', '.join(space)})", flush=True)

    def next_order(self) -> Optional[Tuple]:
        """(trial number, values, run folder, resume?) of the next trial, or None: the budget is spent."""
        with TakeTurns(self.out):
            self.trial = next_trial(self.study, self.out, self.worker, self.args.sampler_seed, self.budget, self.grid)
            if self.trial is None:
                return None
            values = suggest(self.trial, self.space)
            run_dir = self.out / "trials" / f"{self.trial.number:03d}"
            self.trial.set_user_attr("run_dir", str(run_dir))
            resume = resume_interrupted(self.trial, self.args.method, self.training_args, values, run_dir)
        return self.trial.number, values, run_dir, resume

    def report(self, record: Dict, epochs: int) -> str:
        """Why the trial is pruned after this epoch's record, or ""."""
        self.trial.report(record["val_f1_macro"], record["epoch"])
        if record["epoch"] < epochs and self.trial.should_prune():  # a trial at its last epoch has spent its budget: keep it
            return f"val f1_macro {record['val_f1_macro']:.4f} at epoch {record['epoch']}, below the median"
        return ""

    def tell(self, state, value: Optional[float] = None, run_dir: Optional[Path] = None) -> None:
        if value is not None:
            self.trial.set_user_attr("preset", preset_of(run_dir))
        told = self.study.tell(self.trial, value, state=None if value is not None else state)
        if told.state.name != "FAIL":
            print(trial_line(self.study, told), flush=True)

    def summarize(self) -> Optional[Dict]:
        """tune.json's content, written by the last worker to finish; None for the others."""
        with TakeTurns(self.out):
            others = running(self.study)
            if others:
                trials = f"{len(others)} trial{'s' if len(others) > 1 else ''}"
                print(f"{trials} still running in other workers; the last to finish writes {self.out / 'tune.json'}", flush=True)
                return None
            return summarize(self.study, self.args.method, self.out)

    def close(self) -> None:
        self.worker.close()


def run_trials(processes: Processes, search: Optional[Search], method: str, training_args: List[str], epochs: int) -> None:
    """Train trials until the study's budget is spent, every process on the same point."""
    import optuna

    _, train = training_entry(method)
    while True:
        order = processes.decide(lambda: search.next_order())
        if order is None:
            return
        _, values, run_dir, resume = order

        def on_epoch(record: Dict) -> None:
            if "val_f1_macro" not in record:
                raise UsageError("kd.tune needs validation metrics every epoch (--val-size > 0)")
            why = processes.decide(lambda: search.report(record, epochs))  # the gathered score: one decision for all
            if why:
                raise optuna.TrialPruned(why)

        value = None
        try:
            value = train(trial_argv(method, training_args, values, run_dir, resume), on_epoch)["val"]["f1_macro"]  # test is never read
        except optuna.TrialPruned:
            pass
        except RunError:  # a diverging setting (non-finite loss) is a result, not a crash: prune it
            pass
        except BaseException:
            if processes.main:
                search.tell(optuna.trial.TrialState.FAIL)  # recorded, not counted toward --trials
            raise
        if processes.main:
            search.tell(optuna.trial.TrialState.PRUNED, value, run_dir)


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
    parser.add_argument("--trials", type=int, help="trial budget of the search (finished + pruned trials, over all resumes and workers); with --grid: its size")
    parser.add_argument("--output-dir", required=True, help="the search folder: study.db, trials/, best.yaml, trials.png")
    parser.add_argument("--storage", default="sqlite", metavar="sqlite|journal|URL",
                        help="where the study lives: OUTPUT_DIR/study.db (SQLite, one worker), OUTPUT_DIR/study.journal (several "
                             "workers on one machine or a shared file system), or a database URL (workers on many machines)")
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
    check_storage(args.storage)
    epochs = check_training_args(args.method, training_args, list(space)).epochs
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial; a failing trial ends in one error line, no traceback
    out = Path(args.output_dir)
    processes, search = Processes(), None
    try:
        def start() -> None:
            nonlocal search
            search = Search(args, out, space, grid, trials, training_args)

        processes.decide(start)
        run_trials(processes, search, args.method, training_args, epochs)
        return processes.decide(lambda: search.summarize())
    finally:
        if search is not None:
            search.close()
        processes.close()


def summarize(study, method: str, out: Path) -> Dict:
    """tune.json, best.yaml and trials.png of the study's finished trials."""
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
