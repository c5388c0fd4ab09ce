"""The leaderboard (`python -m kd.report RUNS --leaderboard`): each configuration's rows of
kd.report with its difference from the student baseline (95% Welch t interval over seeds), the
settings it ran with (default or tuned), its cost per training image relative to the baseline,
its wall time, and the precision and device it was measured on."""

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from kd.lab import stats
from kd.util.text import format_duration
from kd.errors import UsageError
from kd.train.plots import save_png_atomic
from kd.lab.runs import SHORT_NAMES, Row, Run, cell, fmt_value, is_tuned, run_settings, split_metrics

COMPARED = (("accuracy", "accuracy"), ("f1_macro", "F1 macro"))
PRECISION_NAMES = {"no": "fp32"}


@dataclass
class Entry:
    row: Row
    settings: str  # the method's searched hyperparameters, as this row ran them
    deltas: Dict[str, Optional[stats.Difference]]  # metric -> row minus baseline; None: too few seeds
    step_cost: Optional[float]  # seconds per training image relative to the baseline's (1.5: 50% slower)
    wall_time_s: Optional[float]  # mean over runs of the summed epoch wall time
    measured_on: str  # precision and device


def is_default_student(row: Row) -> bool:
    return all(run.config.get("role") == "student" and run.config.get("method", "supervised") == "supervised"
               and not is_tuned(run) for run in row.runs)


def pick_baseline(rows: Sequence[Row], label: Optional[str] = None) -> Row:
    """The row every other is compared with: `label`, else the one student row with default settings."""
    if label is not None:
        match = [row for row in rows if row.label == label]
        if not match:
            raise UsageError(f"--baseline {label!r} is no row; rows: {', '.join(row.label for row in rows)}")
        return match[0]
    students = [row for row in rows if is_default_student(row)]
    if len(students) != 1:
        found = ", ".join(row.label for row in students) or "none"
        raise UsageError(f"the leaderboard needs one student baseline row, found {found}; name it with --baseline LABEL")
    return students[0]


def history(folder: Path) -> List[Dict]:
    """A run folder's (or a search trial's) history.jsonl: one record per epoch."""
    path = Path(folder) / "history.jsonl"
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise UsageError(f"{path}: line {number} is not a JSON object of an epoch's record; is {path.parent} a kd run?")
        records.append(record)
    return records


def seconds_per_image(run: Run) -> Optional[float]:
    """1 / the median epoch's images per second (the median: the first epoch carries warm-up)."""
    speeds = [record["images_per_s"] for record in history(run.path) if record.get("images_per_s")]
    return 1 / statistics.median(speeds) if speeds else None


def wall_time_s(folder: Path) -> Optional[float]:
    """The epochs' wall time (training and validation) summed over a run or search trial,
    resumed parts included; runs from before epoch_time_s was recorded give their training
    time. None: no epoch yet."""
    records = history(folder)
    key = "epoch_time_s" if records and all("epoch_time_s" in record for record in records) else "train_time_s"
    times = [record[key] for record in records if key in record]
    return sum(times) if times else None


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def searched_settings(run: Run) -> str:
    from kd.lab.space import methods  # the spaces are declared on the method classes

    method = run.config.get("method", "supervised")
    known = methods().get(method)
    values = {**run.config["train"], **(run.config.get("distill") or {})}
    replaced = getattr(known, "standardized_by", {}) if values.get("logit_standardization") else {}
    names = dict.fromkeys(used for name in getattr(known, "search_space", {}) for used in replaced.get(name, (name,)))  # what it trained with
    shown = lambda value: f"{value:.3g}" if isinstance(value, float) else fmt_value(value)  # noqa: E731
    return ", ".join(f"{SHORT_NAMES.get(name, name)}={shown(values.get(name))}" for name in names)


def measured_on(run: Run) -> str:
    precision = run.config.get("mixed_precision") or run.config.get("run", {}).get("mixed_precision") or "?"
    device = run.config.get("device")
    return PRECISION_NAMES.get(precision, precision) + (f", {device}" if device else "")


def _joined(values: Sequence[str]) -> str:
    return " / ".join(dict.fromkeys(values))  # distinct, in order


def _values(row: Row, split: str) -> Dict[str, List[float]]:
    """The compared metrics of each of the row's runs: {metric: [value per run]}."""
    return {key: [float(split_metrics(run, split)[key]) for run in row.runs] for key, _ in COMPARED}


def entries(rows: Sequence[Row], baseline: Row, split: str = "test") -> List[Entry]:
    base_cost = _mean(seconds_per_image(run) for run in baseline.runs)
    out = []
    for row in rows:
        values, base = _values(row, split), _values(baseline, split)
        cost = _mean(seconds_per_image(run) for run in row.runs)
        out.append(Entry(
            row=row,
            settings=_joined([searched_settings(run) for run in row.runs]),
            deltas={key: None if row is baseline else stats.welch_interval(values[key], base[key]) for key, _ in COMPARED},
            step_cost=cost / base_cost if cost and base_cost else None,
            wall_time_s=_mean(wall_time_s(run.path) for run in row.runs),
            measured_on=_joined([measured_on(run) for run in row.runs]),
        ))
    return out


def _interval_cell(d: Optional[stats.Difference]) -> str:
    return "n/a (n < 2)" if d is None else f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"


def to_markdown(items: Sequence[Entry], baseline: Row, split: str = "test") -> str:
    base_hardware = _joined([measured_on(run) for run in baseline.runs])
    header = ["configuration", "settings", "n", "accuracy", "F1 macro", "Δ accuracy [95% CI]", "Δ F1 macro [95% CI]",
              "step cost", "wall time", "measured on"]
    lines = [
        f"Leaderboard, {split} split: mean ± sample std over seeds (n runs), from the weights kept by validation macro F1. "
        f"Δ: difference of means from the baseline `{baseline.label}`, with the 95% Welch t interval. "
        "Step cost: time per training image relative to the baseline (median epoch). "
        "Wall time: the epochs' wall time (training and validation) summed per run, mean over runs. "
        "Rows marked ≠ were measured on other hardware or precision than the baseline: their cost columns do not compare.",
        "",
        "| " + " | ".join(header) + " |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|--:|:--|",
    ]
    for entry in items:
        row = entry.row
        differs = "≠ " if entry.measured_on != base_hardware else ""
        cells = [row.label, entry.settings or "–", str(row.n), *(cell(*row.stats[key]) for key, _ in COMPARED),
                 *(("baseline" if row is baseline else _interval_cell(entry.deltas[key])) for key, _ in COMPARED),
                 f"{entry.step_cost:.2f}×" if entry.step_cost else "–",
                 format_duration(entry.wall_time_s) if entry.wall_time_s is not None else "–",
                 differs + entry.measured_on]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _is_tuned(row: Row) -> bool:
    return all(is_tuned(run) for run in row.runs)


def _untuned_settings(row: Row) -> str:
    """What a tuned row shares with its method's default row: the role, the method and every
    setting outside the method's search space (and the settings standardization uses in their
    place), as one comparable string."""
    from kd.lab.space import methods

    run = row.runs[0]
    method = run.config.get("method", "supervised")
    known = methods().get(method)
    searched = set(getattr(known, "search_space", {}))
    searched |= {used for name in searched for used in getattr(known, "standardized_by", {}).get(name, ())}
    settings = {name: value for name, value in run_settings(run).items() if name not in searched}
    return json.dumps([run.config.get("role"), method, settings], sort_keys=True)


def _seeds(row: Row) -> str:
    return ", ".join(str(seed) for seed in sorted(run.config["train"].get("seed") for run in row.runs))


def tuned_markdown(items: Sequence[Entry], split: str = "test") -> str:
    """Each tuned row against its method's default row (the same settings outside the method's
    search space): tuned minus default with the 95% Welch interval, so that what tuning on
    validation bought on the test split is read off, not worked out from two rows. "" when no
    tuned row has a default row."""
    defaults = {}
    for entry in items:
        if not _is_tuned(entry.row):
            defaults.setdefault(_untuned_settings(entry.row), []).append(entry)
    lines = []
    for entry in items:
        matches = defaults.get(_untuned_settings(entry.row), []) if _is_tuned(entry.row) else []
        if len(matches) != 1:  # none, or default rows that differ only in searched settings: no one row to set it against
            continue
        default = matches[0]
        tuned, untuned = _values(entry.row, split), _values(default.row, split)
        differences = [stats.welch_interval(tuned[key], untuned[key]) for key, _ in COMPARED]
        lines.append(f"| {default.row.label} | {default.settings or '–'} (seeds {_seeds(default.row)}) | "
                     f"{entry.settings or '–'} (seeds {_seeds(entry.row)}) | {' | '.join(map(_interval_cell, differences))} |")
    if not lines:
        return ""
    return "\n".join([f"Tuned against default, {split} split: each tuned row minus its method's default row (every setting "
                      "outside the method's search space the same), with the 95% Welch t interval:", "",
                      "| method | default | tuned | Δ accuracy [95% CI] | Δ F1 macro [95% CI] |", "|:--|:--|:--|--:|--:|", *lines]) + "\n"


def searches_markdown(searches: Dict[str, Optional[Dict]], gains: Optional[Dict[str, Optional[float]]] = None) -> str:
    """The searches behind the tuned rows: {method: its tune.json, or None (no search yet)}, and
    how far each lifted validation F1 above the method's default run on the search's seed
    (`gains`; None: not known)."""
    gains = gains or {}
    lines = ["Searches (`kd.tune`; its trials evaluate on validation only):", "",
             "| method | trials (pruned) | searched | best point | its validation F1 macro | over the default's (same seed) |",
             "|:--|--:|:--|:--|--:|--:|"]
    for method, summary in searches.items():
        if summary is None:
            lines.append(f"| {method} | 0 | – | – | – | – |")
            continue
        grid = summary.get("grid")
        searched = ("grid " + "; ".join(f"{name} {', '.join(fmt_value(v) for v in values)}" for name, values in grid.items())
                    if grid else "TPE draws")
        best = ", ".join(f"{name}={fmt_value(value)}" for name, value in summary["best_params"].items())
        gain = "n/a" if gains.get(method) is None else f"{gains[method]:+.4f}"
        reused = f", {summary['reused']} reused" if summary.get("reused") else ""  # runs taken as trials (kd.tune --reuse-runs)
        lines.append(f"| {method} | {summary['trials']} ({summary['pruned']}){reused} | {searched} | {best} | {summary['best_val_f1_macro']:.4f} | {gain} |")
    return "\n".join(lines) + "\n"


def plain_loop_markdown(ours: Sequence[Dict], plain: Sequence[Dict]) -> str:
    """Our loop against scripts/plain_loop.py at the same budget: the default student's runs'
    metrics.json (`ours`) and the plain loop's (`plain`), their test accuracy and macro F1 over
    seeds, and plain minus ours with its 95% Welch interval."""
    settings = [run["settings"] for run in plain]
    budget = "; ".join(dict.fromkeys(f"{s['model']}, {s['epochs']} epochs, batch {s['batch_size']}, lr {fmt_value(s['lr'])}, "
                                      f"{s['precision']}" for s in settings))
    lines = [f"Our loop against a plain PyTorch loop at equal budget (`scripts/plain_loop.py`, written apart from kd's data and "
             f"loop: {budget}; each keeps the epoch with the best validation macro F1 on its own split):", "",
             "| loop | n | accuracy | F1 macro |", "|:--|--:|--:|--:|"]
    values = {}
    for label, runs in (("kd (`train_student.py`, the student row)", ours), ("plain PyTorch (`scripts/plain_loop.py`)", plain)):
        values[label] = {key: [run["test"][key] for run in runs] for key, _ in COMPARED}
        cells = [cell(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None) for v in values[label].values()]
        lines.append(f"| {label} | {len(runs)} | {' | '.join(cells)} |")
    kd_values, plain_values = values.values()
    differences = [stats.welch_interval(plain_values[key], kd_values[key]) for key, _ in COMPARED]
    lines.append("| plain − kd [95% CI] | | " + " | ".join(map(_interval_cell, differences)) + " |")
    return "\n".join(lines) + "\n"


def compute_markdown(runs: Sequence[Path], trials: Sequence[Path], parallel: int, plain: Sequence[Path] = ()) -> str:
    """What the leaderboard's folders cost, however many invocations made them: the epochs' wall
    time summed over the run folders, the plain loop's and the searches' trial folders present (a
    run started over keeps only its last attempt's), and that sum over `parallel`, a rough driver
    wall time."""
    run_times = [t for t in map(wall_time_s, runs) if t is not None]
    plain_times = [t for t in map(wall_time_s, plain) if t is not None]
    trial_times = [t for t in map(wall_time_s, trials) if t is not None]
    total = sum(run_times) + sum(plain_times) + sum(trial_times)
    plain_part = f", {len(plain_times)} plain-loop run{'s' * (len(plain_times) != 1)}" if plain_times else ""
    plain_time = f", plain loop {format_duration(sum(plain_times))}" if plain_times else ""
    return (f"Compute: {len(run_times)} runs{plain_part} and {len(trial_times)} search trial{'s' * (len(trial_times) != 1)}, "
            f"{format_duration(total)} of epochs' wall time summed (runs {format_duration(sum(run_times))}{plain_time}, "
            f"trials {format_duration(sum(trial_times))}); with {parallel} at a time, "
            f"about {format_duration(total / parallel)} of driver wall time.\n")


COLLAPSED = 0.1  # a row this far below the baseline's F1 macro (runs that diverged) is pinned to the plot's edge


def x_span(points: Sequence[Tuple[float, float, float]]) -> Optional[Tuple[float, float]]:
    """The x-range of the plot for (Δ, low, high) points: zero and the intervals of the rows that
    did not collapse, so that one diverged method does not squeeze the others' differences into
    a sliver; None where no row collapsed (or all did): the plot spans everything."""
    kept = [point for point in points if point[0] >= -COLLAPSED]
    if len(kept) in (0, len(points)):
        return None
    low, high = min(0.0, *(point[1] for point in kept)), max(0.0, *(point[2] for point in kept))
    pad = 0.08 * (high - low or 1.0)
    return low - pad, high + pad


def draw(items: Sequence[Entry], baseline: Row, path: Path, split: str = "test") -> Path:
    """Δ F1 macro from the baseline per row with its 95% interval as the error bar; rows with
    too few seeds for an interval are drawn as a point, rows that collapsed (see x_span) as an
    arrow at the left edge with their Δ written beside it."""
    from matplotlib.figure import Figure

    shown = [entry for entry in items if entry.row is not baseline]
    points = []
    for entry in shown:
        d = entry.deltas["f1_macro"]
        mean = d.mean if d else entry.row.stats["f1_macro"][0] - baseline.stats["f1_macro"][0]
        points.append((mean, d.low, d.high) if d else (mean, mean, mean))
    span = x_span(points)
    figure = Figure(figsize=(8, 1.4 + 0.45 * max(1, len(shown))), layout="constrained")
    axes = figure.subplots()
    positions = range(len(shown))[::-1]  # the first (best) row on top
    for position, entry, (mean, low, high) in zip(positions, shown, points):
        interval = entry.deltas["f1_macro"] is not None
        colour = "C0" if interval else "grey"
        if span and mean < span[0]:
            axes.plot(span[0], position, "<", color=colour)
            axes.annotate(f"{mean:+.3f}", (span[0], position), xytext=(8, 0), textcoords="offset points", va="center")
        else:
            axes.errorbar(mean, position, xerr=[[mean - low], [high - mean]] if interval else None, fmt="o", capsize=3, color=colour)
    if span:
        axes.set_xlim(*span)
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_yticks(list(positions), [f"{entry.row.label} (n={entry.row.n})" for entry in shown])
    axes.set_xlabel(f"Δ {split} F1 macro from {baseline.label} (95% Welch interval)")
    axes.grid(alpha=0.3, axis="x")
    return save_png_atomic(figure, Path(path))
