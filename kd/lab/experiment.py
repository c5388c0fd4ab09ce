"""What the leaderboard experiment trains, and in which order: the budgets (a teacher/student
pair, presets, runs at a time), each row's default runs seed by seed, the plain loop beside the
baseline, each method's search and its tuned runs, and what decides which tuned rows run
(--tuned-top). kd.leaderboard runs the plan; kd.lab.scheduler executes its jobs."""

import contextlib
import functools
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from kd import config
from kd.cli import distill_parser, train_parser
from kd.train.device import choose_precision
from kd.distillers import DISTILLERS
from kd.errors import UsageError
from kd.lab.scheduler import Job
from kd.lab.space import SUPERVISED, declared_grid, grid_points, grid_specs, methods

PRESETS = Path(__file__).resolve().parents[2] / "presets"  # kd/lab/ -> the repository
PLAIN_LOOP = Path(__file__).resolve().parents[2] / "scripts" / "plain_loop.py"
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


def check_flags(budget: Budget, dataset: str, extra: Sequence[str], modes: Sequence[str]) -> None:
    """The driver passes its extra flags to every run: each script that will train takes them
    (the teacher's and each method's only where a row distils), or a one-line error now, before
    anything is restored or run, rather than every run failing in its own log."""
    scripts = [("train_student.py", budget.student, train_parser("student"), [])]
    distilled = list(dict.fromkeys(VARIANTS.get(mode, (mode, []))[0] for mode in modes if mode != SUPERVISED))
    if distilled:
        scripts.insert(0, ("train_teacher.py", budget.teacher, train_parser("teacher"), []))
    scripts += [("distill.py", budget.student, distill_parser(), ["--mode", mode, "--teacher", "TEACHER"]) for mode in distilled]
    for script, preset, parser, method in scripts:
        refused = io.StringIO()
        try:
            with contextlib.redirect_stderr(refused):
                config.parse(parser, ["--config", str(PRESETS / preset), "--dataset", dataset, *method, *extra])
        except (SystemExit, UsageError) as error:
            said = refused.getvalue().strip().splitlines()
            why = said[-1].removeprefix("error: ") if said else str(error)
            raise UsageError(f"{script}{' --mode ' + method[1] if method else ''} refuses the driver's flags, which go to every run: {why}") from None


def plain_loop_flags(budget: Budget, dataset: str, extra: Sequence[str]) -> Tuple[Optional[List[str]], str]:
    """scripts/plain_loop.py's flags at the student budget as the baseline's runs resolve it
    (preset, then `extra`, which check_flags has let through; the precision kd picks on this
    machine), or None and why it cannot train at that budget."""
    if not any((Path(dataset) / "plain_text").glob("train-*.parquet")):
        return None, f"it reads a local folder in the Hub's layout (plain_text/train-*.parquet), and {dataset} is not one"
    cfg, _, run = config.parse(train_parser("student"), ["--config", str(PRESETS / budget.student), "--dataset", dataset, *extra])  # check_flags took them
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
    the teacher (where a row needs it), then every row's default run seed by seed (so that each row has n = 2, enough
    for an interval, before any has n = 3; the plain loop with its `plain` flags after each of
    the baseline's), then each method's search and its tuned runs (on
    tuned_seeds: not the search's seed; with `tuned_top`, for the methods it moved most)."""
    runs, searches = out / "runs", out / "tune"
    common = ["--dataset", dataset, "--report-to", "none", *extra]
    teacher = runs / "teacher"
    student = ["--config", str(PRESETS / budget.student), *common]
    rows = {}  # name -> (script, needs, flags naming the method)
    for mode in dict.fromkeys([SUPERVISED, *modes]):  # the baseline's default runs always
        base, switches = VARIANTS.get(mode, (mode, []))
        if mode == SUPERVISED:
            rows["student"] = ("train_student", [], [])
        else:
            rows[mode] = ("distill", ["teacher"], ["--teacher", str(teacher), "--mode", base, *switches])
    # the teacher only where a row distils from it (`--modes supervised`: the baseline alone)
    jobs = [Job("teacher", teacher, training("train_teacher", teacher, ["--config", str(PRESETS / budget.teacher), *common, "--seed", "0"]))
            ] if any(needs for _, needs, _ in rows.values()) else []
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


def all_modes() -> List[str]:
    return [SUPERVISED, *DISTILLERS, *VARIANTS]
