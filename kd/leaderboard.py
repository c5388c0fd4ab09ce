"""The leaderboard experiment, resumable: a teacher, the student baseline, and every
distillation method with its paper defaults and tuned on validation (kd.tune), over seeds.

    python -m kd.leaderboard run --dataset PATH --out DIR --budget cpu [--seeds 3] [--trials N|grid] [--tuned-top K|all]
        [--modes ...] [--record DIR] [--dry-run]

Flags it does not know go to every training and search (e.g. --epochs 1 for a smoke test).
Beside each seed of the student baseline, scripts/plain_loop.py trains the same model at the
same budget (DIR/plain/sSEED), so that the leaderboard shows our loop against a plain PyTorch
loop. Finished runs (metrics.json) are skipped, interrupted ones resumed (--resume), searches
continued, and a tuned run no longer trained with its search's best point redone; P
trainings run at a time. At the end, DIR/leaderboard.md and .png
(`python -m kd.report DIR/runs --leaderboard`), then a table of the searches and their trials,
then the plain-loop comparison, then the compute behind the folders (epochs' wall time summed
over runs and trials). With --record DIR, every finished run's and search's small files are kept
in DIR, a folder to commit, and restored from it on a new machine (kd.record)."""

import argparse
import contextlib
import functools
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from kd import config
from kd.cli import ROLES
from kd.config import Parser
from kd.device import choose_precision, cpu_name
from kd.distillers import DISTILLERS
from kd.engine import format_duration
from kd.errors import RunError, UsageError, main_guard
from kd.export import write_text_atomic
from kd.record import Recording
from kd.scheduler import Job, execute
from kd.tune import SUPERVISED, declared_grid, grid_points, grid_specs, methods

PRESETS = Path(__file__).resolve().parents[1] / "presets"
PLAIN_LOOP = Path(__file__).resolve().parents[1] / "scripts" / "plain_loop.py"
# the student budget's settings the plain loop takes as flags; the others must be kd's defaults
PLAIN_FIELDS = ("model", "epochs", "lr", "batch_size", "momentum", "weight_decay", "warmup_epochs", "val_size")
# Rows that are a method plus a switch: (method, its flags). Defaults only: the method's search
# space does not act on what the switch changes (standardised logits use --ls-* settings).
VARIANTS = {"logits-ls": ("logits", ["--logit-standardization"])}
# Every search trains its trials on this seed, and a tuned row runs on the n seeds after it: the
# trial the search picked is never one of the row's runs (its own validation noise chose it, and
# on CPU the same settings and seed give the same run, so it would lift the row's mean).
SEARCH_SEED = 0


@dataclass(frozen=True)
class Budget:
    teacher: str  # preset of the teacher's training (presets/)
    student: str  # preset of every student-side run: baseline, each method, each trial
    parallel: int  # trainings at a time
    threads: Optional[int]  # torch threads per training (None: torch's default)
    trials: Union[int, str]  # default search budget per method: TPE trials, or "grid" (each method's search_grid)
    tuned_top: Optional[int] = None  # tuned rows for only the methods tuning moved most (None: every searched one)
    gpu_per_run: bool = False  # pin each parallel run to its own GPU (CUDA_VISIBLE_DEVICES)


BUDGETS = {
    # the thin pair cifar_resnet20 -> cifar_resnet8 at CPU epochs: 2 cores, one thread per run
    # (a run costs 12-45 core-minutes there: a few grid points per method, not a TPE search, and
    # tuned rows for the 3 methods it moved most)
    "cpu": Budget("cpu-thin-teacher.yaml", "cpu-thin-student.yaml", parallel=2, threads=1, trials="grid", tuned_top=3),
    # the report's pair cifar_resnet14x4 -> cifar_resnet8x4 at GPU epochs: one run per GPU
    "gpu": Budget("gpu-teacher.yaml", "gpu-student.yaml", parallel=1, threads=None, trials=30, gpu_per_run=True),
}


def training(script: str, out: Path, flags: Sequence[str]) -> List[str]:
    return [sys.executable, "-m", script, *flags, "--output-dir", str(out)]


def without_flags(flags: Sequence[str], names: Sequence[str]) -> List[str]:
    """`flags` less each `--name value` / `--name=value` of `names` (config field names)."""
    dropped = {"--" + name.replace("_", "-") for name in names}
    kept, skip_value = [], False
    for flag in flags:
        if skip_value:
            skip_value = False
        elif flag in dropped:
            skip_value = True
        elif flag.split("=", 1)[0] not in dropped:
            kept.append(flag)
    return kept


def search_budget(mode: str, trials: Union[int, str]) -> Optional[Tuple[List[str], int, Optional[Dict]]]:
    """(kd.tune's budget flags, trial count, grid) for `mode`: --trials N, or --grid with its
    declared points (None: a grid budget and no search_grid declared, so no search)."""
    if trials != "grid":
        return ["--trials", str(trials)], trials, None
    grid = declared_grid(mode)
    return (["--grid", *grid_specs(grid)], len(grid_points(grid)), grid) if grid else None


def plain_loop_flags(budget: Budget, dataset: str, extra: Sequence[str]) -> Tuple[Optional[List[str]], str]:
    """scripts/plain_loop.py's flags at the student budget as the baseline's runs resolve it
    (preset, then `extra`; the precision kd picks on this machine), or None and why it cannot
    train at that budget."""
    if not any((Path(dataset) / "plain_text").glob("train-*.parquet")):
        return None, f"it reads a local folder in the Hub's layout (plain_text/train-*.parquet), and {dataset} is not one"
    student, refused = config.build_parser("train_student.py", "", ROLES["student"]), io.StringIO()
    try:
        with contextlib.redirect_stderr(refused):
            cfg, _, run = config.parse(student, ["--config", str(PRESETS / budget.student), "--dataset", dataset, *extra])
    except (SystemExit, UsageError) as error:  # the baseline's runs will refuse them too, each in its log
        return None, f"train_student.py refuses the flags ({refused.getvalue().strip() or error})"
    differs = {"label_smoothing": cfg.label_smoothing != 0, "grad_accum": cfg.grad_accum != 1,
               "max_train_samples": cfg.max_train_samples is not None, "max_eval_samples": cfg.max_eval_samples is not None}
    unequal = [name for name, set_here in differs.items() if set_here]
    if unequal:
        return None, f"the student budget sets {', '.join(unequal)}, which the plain loop does not do"
    precision = choose_precision(run.mixed_precision, warn=lambda line: None, launcher_argv=None, script="train_student.py")
    flags = [part for name in PLAIN_FIELDS for part in ("--" + name.replace("_", "-"), str(getattr(cfg, name)))]
    return [*flags, "--precision", precision.label], ""


def plan(out: Path, budget: Budget, dataset: str, seeds: int, trials: Union[int, str], modes: Sequence[str],
         extra: Sequence[str], tuned_top: Optional[int] = None, plain: Optional[Sequence[str]] = None) -> List[Job]:
    """Every run of the leaderboard, each with the runs it needs first, in the order they start:
    the teacher, then every row's default run seed by seed (so that each row has n = 2, enough
    for an interval, before any has n = 3; the plain loop with its `plain` flags after each of
    the baseline's), then each method's search and its tuned runs (on
    tuned_seeds: not the search's seed; with `tuned_top`, for the methods it moved most)."""
    runs, searches = out / "runs", out / "tune"
    common = ["--dataset", dataset, "--report-to", "none", *extra]
    teacher = runs / "teacher"
    student = ["--config", str(PRESETS / budget.student), *common]
    jobs = [Job("teacher", teacher, training("train_teacher", teacher, ["--config", str(PRESETS / budget.teacher), *common, "--seed", "0"]))]
    rows = {}  # name -> (script, needs, flags naming the method)
    for mode in dict.fromkeys([SUPERVISED, *modes]):  # the baseline's default runs always
        base, switches = VARIANTS.get(mode, (mode, []))
        if mode == SUPERVISED:
            rows["student"] = ("train_student", [], [])
        else:
            rows[mode] = ("distill", ["teacher"], ["--teacher", str(teacher), "--mode", base, *switches])
    for seed in range(seeds):
        for name, (script, needs, method) in rows.items():
            folder = runs / name / "default" / f"s{seed}"
            jobs.append(Job(f"{name}/default/s{seed}", folder, training(script, folder, [*student, *method, "--seed", str(seed)]), needs))
            if name == "student" and plain is not None:
                folder = out / "plain" / f"s{seed}"
                jobs.append(Job(f"plain/s{seed}", folder, [sys.executable, str(PLAIN_LOOP), dataset, *plain, "--seed", str(seed), "--output-dir", str(folder)]))
    searched = {}  # name -> kd.tune's budget flags, trial count and grid, for each row with a search
    for name in rows:
        mode = SUPERVISED if name == "student" else name
        budgeted = search_budget(mode, trials) if trials != 0 and mode in modes and mode not in VARIANTS else None
        if budgeted is not None:
            searched[name] = budgeted
    ranked = [name for name in searched if name != "student"]  # --tuned-top ranks the methods; the baseline's tuned row always runs
    gated = tuned_top is not None and len(ranked) > tuned_top
    verdict = [need for name in ranked for need in (f"{name}/tune", f"{name}/default/s{SEARCH_SEED}")] if gated else []
    for name, (budget_flags, count, grid) in searched.items():
        script, needs, method = rows[name]
        mode, search = SUPERVISED if name == "student" else name, searches / name
        from_teacher = method[:2]  # --teacher DIR (nothing for the baseline)
        # the default run on the search's seed is the method's default point: where the search
        # holds that point, kd.tune takes the run as its trial instead of training it again
        default = f"{name}/default/s{SEARCH_SEED}"
        searching = [sys.executable, "-m", "kd.tune", "--method", mode, *budget_flags, "--output-dir", str(search),
                     *student, *from_teacher, "--seed", str(SEARCH_SEED), "--reuse-runs", str(runs / default)]
        jobs.append(Job(f"{name}/tune", search, searching, needs, trials=count, grid=grid, after=[default]))
        # the command line overrides --config: a searched setting among the extra flags would undo the search
        tuned_common = ["--dataset", dataset, "--report-to", "none", *without_flags(extra, methods()[mode].search_space)]
        folders = [runs / name / "tuned" / f"s{seed}" for seed in tuned_seeds(seeds)]
        ranks = name in ranked and gated
        gate = functools.partial(left_out, out, name, ranked, tuned_top, folders) if ranks else None
        for seed, folder in zip(tuned_seeds(seeds), folders):
            flags = [*tuned_common, "--config", str(search / "best.yaml"), *method, "--seed", str(seed), "--tags", "tuned"]
            jobs.append(Job(f"{name}/tuned/s{seed}", folder, training(script, folder, flags), [f"{name}/tune"], search=search,
                            after=verdict if ranks else [], gate=gate))
    return jobs


def gain(out: Path, name: str) -> Optional[float]:
    """How far row `name`'s search lifted validation macro F1 above its default run on the
    search's seed (None: either is missing)."""
    summary, default = out / "tune" / name / "tune.json", out / "runs" / name / "default" / f"s{SEARCH_SEED}" / "metrics.json"
    if not (summary.is_file() and default.is_file()):
        return None
    return json.loads(summary.read_text())["best_val_f1_macro"] - json.loads(default.read_text())["val"]["f1_macro"]


def left_out(out: Path, name: str, ranked: Sequence[str], top: int, folders: Sequence[Path]) -> Optional[str]:
    """Why method `name`'s tuned runs (`folders`) are left out under --tuned-top `top` (None:
    they run), asked once every method in `ranked` has its search and its default run on the
    search's seed, finished or failed. Gains are compared as shown, to 4 decimals: ties at the cut
    all run, and a method with no gain (one of the two failed) takes no place. A method whose
    tuned runs are begun keeps its row, completed and kept current: none is left partial or stale."""
    if any((folder / "run_config.json").is_file() for folder in folders):
        return None
    gains = {method: gain(out, method) for method in ranked}
    gains = {method: None if value is None else round(value, 4) for method, value in gains.items()}  # compared as shown
    if gains[name] is None:
        return f"no gain to rank: its search or its default run on seed {SEARCH_SEED} did not finish"
    known = sorted((value for value in gains.values() if value is not None), reverse=True)
    cut = known[min(top, len(known)) - 1]
    if gains[name] >= cut:
        return None
    leaders = sorted((method for method in ranked if gains[method] is not None and gains[method] >= cut), key=gains.get, reverse=True)
    return (f"tuning moved its validation F1 {gains[name]:+.4f}, below the {top} it moved most "
            f"({', '.join(f'{method} {gains[method]:+.4f}' for method in leaders)})")


def tuned_seeds(seeds: int) -> range:
    return range(SEARCH_SEED + 1, SEARCH_SEED + 1 + seeds)


def foreign_runs(out: Path) -> List[Path]:
    """Finished runs under DIR/runs that no plan of this driver holds, which kd.report counts all
    the same: a tuned run on or below the search's seed (an older driver's), or anything that is
    neither the teacher nor ROW/{default,tuned}/sSEED."""
    runs = out / "runs"
    foreign = []
    for folder in sorted(metrics.parent for metrics in runs.rglob("metrics.json")):
        parts = folder.relative_to(runs).parts
        if parts == ("teacher",):
            continue
        seed = parts[2][1:] if len(parts) == 3 and parts[2][:1] == "s" else ""
        if not seed.isdigit() or parts[1] not in ("default", "tuned") or (parts[1] == "tuned" and int(seed) <= SEARCH_SEED):
            foreign.append(folder)
    return foreign


def print_plan(jobs: Sequence[Job]) -> None:
    statuses = [job.status() for job in jobs]  # each reads the job's folder: once
    settled = {job.name for job, status in zip(jobs, statuses) if status == "skip"}
    statuses = ["out" if status != "skip" and job.gate and settled.issuperset(job.needs + job.after) and job.gate() else status
                for job, status in zip(jobs, statuses)]
    for job, status in zip(jobs, statuses):
        print(f"{status:6s} {job.name:28s} {' '.join(job.argv()[1:])}")
    counts = {status: statuses.count(status) for status in ("run", "resume", "redo", "skip", "out", "busy")}
    redo = f", {counts['redo']} to redo (their search's best point changed)" if counts["redo"] else ""
    out = f", {counts['out']} left out (--tuned-top)" if counts["out"] else ""
    busy = f", {counts['busy']} busy (another process trains them; waited for)" if counts["busy"] else ""
    print(f"plan: {counts['run']} to run, {counts['resume']} to resume{redo}, {counts['skip']} done{out}{busy}")


def made_with(args, extra: Sequence[str]) -> Dict:
    """What a record's runs must share with this driver's to be taken as its own: the budget, the
    data set, the flags for every run, and the machine (its precision and the device's name)."""
    import torch

    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name()
    precision = choose_precision(None, warn=lambda line: None, launcher_argv=None, script="train_student.py").label
    return {"budget": args.budget, "dataset": args.dataset, "flags": list(extra), "precision": precision, "machine": machine}


def all_modes() -> List[str]:
    return [SUPERVISED, *DISTILLERS, *VARIANTS]


def top_count(text: str) -> Optional[int]:
    if text == "all":
        return None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"want a number of methods >= 1 or 'all', got {text!r}")


def trial_budget(text: str) -> Union[int, str]:
    if text == "grid":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number of trials or 'grid', got {text!r}") from None


def build_parser() -> Parser:
    parser = Parser(prog="python -m kd.leaderboard", description=__doc__.splitlines()[0], allow_abbrev=False,
                    epilog="Every other flag is passed to each training and search.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train and search what is not done yet, then write the leaderboard", allow_abbrev=False)
    run.add_argument("--dataset", required=True, help="the data set folder or Hub id, for every run")
    run.add_argument("--out", required=True, help="the experiment folder: runs/, tune/, leaderboard.md")
    run.add_argument("--budget", required=True, choices=sorted(BUDGETS), help="cpu: cifar_resnet20 -> cifar_resnet8; gpu: cifar_resnet14x4 -> cifar_resnet8x4")
    run.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default: 3)")
    run.add_argument("--trials", type=trial_budget, help="kd.tune trials per method (TPE), or 'grid': each method's declared "
                     "search_grid; 0: defaults only (default: the budget's: cpu grid, gpu 30)")
    run.add_argument("--tuned-top", type=top_count, default=argparse.SUPPRESS, metavar="K|all",
                     help="run tuned presets over seeds for only the K methods whose search lifted validation F1 most above "
                          "their default run on the search's seed; the student's always (default: the budget's: cpu 3, gpu all)")
    run.add_argument("--modes", nargs="+", help=f"methods (default: all: {' '.join(all_modes())}; variants are run with defaults only)")
    run.add_argument("--parallel", type=int, help="trainings at a time (default: the budget's)")
    run.add_argument("--dry-run", action="store_true", help="print the plan (run / resume / redo / skip / out / busy per run) and stop")
    run.add_argument("--record", help="a folder to keep in git (kd.record): every finished run's and search's small files are saved "
                     "there as they finish, and restored from it into --out where missing (those that need the teacher once "
                     "the teacher here has the record's weights)")
    return parser


@main_guard
def main(argv: Optional[Sequence[str]] = None) -> None:
    args, extra = build_parser().parse_known_args(argv)
    budget = BUDGETS[args.budget]
    modes = args.modes or all_modes()
    unknown = [mode for mode in modes if mode not in all_modes()]
    if unknown:
        raise UsageError(f"unknown mode {unknown[0]!r}; choose from {', '.join(all_modes())}")
    trials = budget.trials if args.trials is None else args.trials
    if args.seeds < 1 or (trials != "grid" and trials < 0) or (args.parallel is not None and args.parallel < 1):
        raise UsageError("--seeds and --parallel must be >= 1 and --trials >= 0")
    if any(flag.split("=", 1)[0] in ("--no-test-eval", "--test-eval") for flag in extra):
        raise UsageError("the leaderboard reads every run's test split: drop --no-test-eval (its searches' trials skip it by themselves)")
    out = Path(args.out)
    tuned_top = getattr(args, "tuned_top", budget.tuned_top)
    plain, why_not = plain_loop_flags(budget, args.dataset, extra)
    jobs = plan(out, budget, args.dataset, args.seeds, trials, modes, extra, tuned_top, plain)
    for mode in modes:
        if trials == "grid" and mode not in VARIANTS and not declared_grid(mode):
            print(f"note: {mode} declares no search_grid (kd/distillers/): defaults only under --trials grid", flush=True)
    if plain is None:
        print(f"note: no plain-loop comparison: {why_not}", flush=True)
    foreign = foreign_runs(out)
    if foreign:
        print(f"note: the leaderboard counts every run under {out / 'runs'}, and no plan holds "
              f"{', '.join(str(path.relative_to(out / 'runs')) for path in foreign)}: move it out of there to leave it out", flush=True)
    keeping = Recording(Path(args.record), out, made_with(args, extra)) if args.record and not args.dry_run else None
    if keeping:
        keeping.restore()
        keeping.save()  # what this folder had before this invocation, in case it is stopped before a job finishes
    elif args.record:
        print(f"note: a dry run restores nothing from {args.record}: the plan shows {out} as it is", flush=True)
    print_plan(jobs)
    if args.dry_run:
        return
    began, parallel = time.monotonic(), args.parallel or budget.parallel
    hooks = {"on_done": lambda job: keeping.save(), "before": keeping.before} if keeping else {}
    failed, finished = execute(jobs, parallel, budget.threads, budget.gpu_per_run, **hooks)
    if keeping:
        keeping.save()
    print(f"driver: {finished} jobs finished, {len(failed)} failed or skipped, in {format_duration(time.monotonic() - began)} "
          f"({parallel} at a time)", flush=True)
    write_leaderboard(out, [mode for mode in modes if mode not in VARIANTS], searched_only=trials == 0, parallel=parallel)
    if failed:
        raise RunError(f"{len(failed)} run(s) failed or were skipped: {', '.join(failed)}; run the same command again to retry them")


def write_leaderboard(out: Path, tuned: Sequence[str], searched_only: bool = False, parallel: int = 1) -> None:
    """DIR/leaderboard.md and .png from the finished runs, then the searches of the `tuned`
    methods (their trial counts; `searched_only`: only those with a search, for --trials 0), then
    the plain loop against the student's default runs, then the compute behind it all (runs
    `parallel` at a time); a note instead when there is no baseline yet."""
    from kd import ranking, report

    board = out / "leaderboard.md"
    try:
        report.main.__wrapped__([str(out / "runs"), "--leaderboard", "--output", str(board)])
    except UsageError as error:
        print(f"note: no leaderboard yet: {error}", file=sys.stderr)
        return
    names = ["student" if mode == SUPERVISED else mode for mode in tuned]  # the rows' names, as in DIR/tune/
    summaries = {name: out / "tune" / name / "tune.json" for name in names}
    summaries = {name: path for name, path in summaries.items() if path.is_file() or not searched_only}
    if summaries:
        searches = ranking.searches_markdown({name: json.loads(path.read_text()) if path.is_file() else None
                                              for name, path in summaries.items()}, {name: gain(out, name) for name in summaries})
        print("\n" + searches, end="")
        write_text_atomic(board, board.read_text() + "\n" + searches)
    ours = sorted((out / "runs" / "student" / "default").glob("s*/metrics.json"))
    plain = sorted((out / "plain").glob("s*/metrics.json"))
    if ours and plain:
        comparison = ranking.plain_loop_markdown([json.loads(path.read_text()) for path in ours], [json.loads(path.read_text()) for path in plain])
        print("\n" + comparison, end="")
        write_text_atomic(board, board.read_text() + "\n" + comparison)
    compute = ranking.compute_markdown([path.parent for path in (out / "runs").glob("**/history.jsonl")],
                                       [path.parent for path in (out / "tune").glob("*/trials/*/history.jsonl")], parallel,
                                       [path.parent for path in (out / "plain").glob("s*/history.jsonl")])
    print("\n" + compute, end="")
    write_text_atomic(board, board.read_text() + "\n" + compute)


if __name__ == "__main__":
    main()
