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
in DIR, a folder to commit, and restored from it on a new machine (kd.lab.record)."""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

from kd.config import Parser
from kd.train.device import choose_precision, cpu_name, gpu_count
from kd.util.text import format_duration
from kd.errors import RunError, UsageError, main_guard
from kd.lab.experiment import BUDGETS, PRESETS, VARIANTS, all_modes, check_flags, foreign_runs, gain, plain_loop_flags, plan
from kd.util.files import write_text_atomic
from kd.lab.record import Recording
from kd.lab.scheduler import Job, execute
from kd.lab.space import SUPERVISED, declared_grid


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
    data set, the flags for every run, the machine (its precision and the device's name), and the
    settings of the budget's presets (a preset changed since is another protocol)."""
    import torch
    import yaml

    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name()
    precision = choose_precision(None, warn=lambda line: None, launcher_argv=None, script="train_student.py").label
    budget = BUDGETS[args.budget]
    presets = {role: yaml.safe_load((PRESETS / name).read_text()) for role, name in (("teacher", budget.teacher), ("student", budget.student))}
    return {"budget": args.budget, "dataset": args.dataset, "flags": list(extra), "precision": precision, "machine": machine, "presets": presets}


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
    run.add_argument("--record", help="a folder to keep in git (kd.lab.record): every finished run's and search's small files are saved "
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
    parallel = args.parallel or budget.parallel
    gpus = gpu_count() if budget.gpu_per_run else None
    if gpus is not None and parallel > gpus:  # a slot past the last GPU would see none and train on the CPU
        raise UsageError(f"--parallel {parallel}: each run takes a GPU of its own and {gpus} are visible; give --parallel {gpus} or fewer")
    if any(flag.split("=", 1)[0] in ("--no-test-eval", "--test-eval") for flag in extra):
        raise UsageError("the leaderboard reads every run's test split: drop --no-test-eval (its searches' trials skip it by themselves)")
    out = Path(args.out)
    tuned_top = getattr(args, "tuned_top", budget.tuned_top)
    check_flags(budget, args.dataset, extra, modes)
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
    keeping = Recording(Path(args.record), out, made_with(args, extra)) if args.record else None  # refuses a record made otherwise
    if keeping and args.dry_run:
        print(f"note: a dry run restores nothing from {args.record}: the plan shows {out} as it is", flush=True)
        keeping = None
    elif keeping:
        keeping.restore()
        keeping.save()  # what this folder had before this invocation, in case it is stopped before a job finishes
    print_plan(jobs)
    if args.dry_run:
        return
    began = time.monotonic()
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
    from kd.lab import ranking, report

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
