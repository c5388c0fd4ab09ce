"""Compare finished runs: one table row per configuration, seeds folded into mean ± std.

    python -m kd.report runs/teacher-s0 runs/teacher-s1 runs/distill-logits-s0 ...
    python -m kd.report runs/cpu-thin            # a folder of run folders
    python -m kd.report runs/leaderboard --leaderboard   # differences from the student baseline

Rows are keyed by method, model and every train/distill setting except the seed; settings
that differ between runs of one method and model are written into the row's label (T=2)."""

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from kd.config import Parser  # argparse with one-line errors, like the training scripts
from kd.errors import UsageError, main_guard
from kd.plots import save_png_atomic
from kd.export import write_text_atomic

METRICS = (("accuracy", "accuracy"), ("f1_macro", "F1 macro"), ("precision_macro", "precision macro"), ("recall_macro", "recall macro"))
NOT_SETTINGS = {"seed"}  # differs between the runs a row folds together
SHORT_NAMES = {"temperature": "T", "logit_standardization": "LS"}  # how a differing setting is written in a label


@dataclass
class Run:
    path: Path
    config: Dict  # run_config.json
    metrics: Dict  # metrics.json


@dataclass
class Row:
    label: str
    runs: List[Run]
    stats: Dict[str, Tuple[float, Optional[float]]] = field(default_factory=dict)  # metric -> (mean, sample std or None)

    @property
    def n(self) -> int:
        return len(self.runs)


def _read_json(path: Path) -> Dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        problem = error.__class__.__name__
        raise UsageError(f"{path} is missing or not valid JSON ({problem}); is {path.parent} a finished kd run?") from error


def _kind(value) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")


def _read_object(path: Path) -> Dict:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds {_kind(data)}, not a JSON object; is {path.parent} a finished kd run?")
    return data


def _read_run_config(path: Path) -> Dict:
    """run_config.json, checked for what the report reads: the train settings with the model's
    name, and objects (or null) where the other sections are."""
    config = _read_object(path)
    train = config.get("train")
    if not isinstance(train, dict) or not isinstance(train.get("model"), str):
        found = "no train section" if "train" not in config else f"train is {_kind(train)}" if not isinstance(train, dict) else "train names no model"
        raise UsageError(f"{path} is not a kd run config ({found}); is {path.parent} a finished kd run?")
    for section in ("run", "distill"):
        if config.get(section) is not None and not isinstance(config[section], dict):
            raise UsageError(f"{path}: its {section} section is {_kind(config[section])}, not an object; is {path.parent} a finished kd run?")
    return config


def _read_metrics(path: Path) -> Dict:
    """metrics.json, checked for what the report reads: each split present is an object with
    the compared metrics as numbers."""
    metrics = _read_object(path)
    for split in ("test", "val"):
        values = metrics.get(split)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UsageError(f"{path}: its {split} entry is {_kind(values)}, not an object of metrics; is {path.parent} a finished kd run?")
        wrong = [key for key, _ in METRICS if isinstance(values.get(key), bool) or not isinstance(values.get(key), (int, float))]
        if wrong:
            raise UsageError(f"{path}: its {split} metrics lack {', '.join(wrong)} as numbers; is {path.parent} a finished kd run?")
    return metrics


def expand(path: Path) -> List[Path]:
    """The run folders `path` names: itself if it holds metrics.json, else the finished runs below it."""
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder; pass run folders (each with metrics.json) or a folder of them")
    if (path / "metrics.json").is_file():
        return [path]
    found = sorted(p.parent for p in path.rglob("metrics.json"))
    unfinished = sorted(p.parent for p in path.rglob("run_config.json") if not (p.parent / "metrics.json").exists())
    skipped = ""
    if unfinished:
        names = ", ".join(str(p) for p in unfinished[:3]) + (", ..." if len(unfinished) > 3 else "")
        skipped = f"{len(unfinished)} unfinished run(s) with no metrics.json: {names}"
    if not found:
        raise UsageError(f"{path} holds no finished run (no metrics.json in it or its subfolders{'; ' + skipped if skipped else ''})")
    if skipped:
        print(f"note: skipping {skipped}", file=sys.stderr)
    return found


def load_runs(paths: Sequence) -> List[Run]:
    """Read every run folder `paths` names (folders of runs are expanded), each once."""
    runs, seen = [], set()
    for folder in (run for path in paths for run in expand(Path(path))):
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        runs.append(Run(folder, _read_run_config(folder / "run_config.json"), _read_metrics(folder / "metrics.json")))
    if not runs:
        raise UsageError("no run folders given")
    return runs


def _teacher_model(source: Optional[str]) -> Optional[str]:
    """The teacher's architecture when its folder is readable, else its path or Hub id as given:
    distillations from different teachers must not fold into one row."""
    if source is None:
        return None
    try:
        return json.loads((Path(source) / "config.json").read_text())["architecture"]
    except (OSError, ValueError, KeyError, TypeError):
        return source


def is_tuned(run: Run) -> bool:
    return "tuned" in run.config.get("run", {}).get("tags", [])  # kd.leaderboard tags runs of a kd.tune preset


def _family(run: Run) -> str:
    method = run.config.get("method", "supervised")
    base = run.config.get("role", "student") if method == "supervised" else f"distill {method}"
    tuned = " tuned" if is_tuned(run) else ""
    return f"{base} ({run.config['train']['model']}){tuned}"


def _settings(run: Run) -> Dict:
    """Everything that makes two runs different experiments; the seed and run infrastructure
    (output folder, precision, trackers) are left out."""
    config = run.config
    settings = {k: v for k, v in config["train"].items() if k not in NOT_SETTINGS}
    settings.update((config.get("distill") or {}).items())
    settings["dataset"] = config.get("run", {}).get("dataset")
    if "teacher" in config:
        settings["teacher"] = _teacher_model(config["teacher"])
    return settings


def _fmt_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def _split_family(family: str, runs: List[Run]) -> List[Row]:
    settings = [_settings(run) for run in runs]
    keys = sorted({k for s in settings for k in s})
    varying = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
    groups: Dict[str, List[Run]] = {}
    for run, setting in zip(runs, settings):
        suffix = ", ".join(f"{SHORT_NAMES.get(k, k)}={_fmt_value(setting.get(k))}" for k in varying)
        groups.setdefault(f"{family} {suffix}".strip(), []).append(run)
    return [Row(label, members) for label, members in groups.items()]


def _split_metrics(run: Run, split: str) -> Dict:
    values = run.metrics.get(split)
    if not values:
        hint = (" (trained with --val-size 0); use --split test" if split == "val"
                else " (trained with --no-test-eval, e.g. a kd.tune trial); use --split val")
        raise UsageError(f"{run.path}/metrics.json has no {split} metrics{hint}")
    return values


def table_rows(runs: Sequence[Run], split: str = "test") -> List[Row]:
    """One row per configuration, with mean and sample std over its runs, best F1 macro first."""
    families: Dict[str, List[Run]] = {}
    for run in runs:
        families.setdefault(_family(run), []).append(run)
    rows = [row for family, members in families.items() for row in _split_family(family, members)]
    for row in rows:
        for key, _ in METRICS:
            values = [float(_split_metrics(run, split)[key]) for run in row.runs]
            row.stats[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)
    return sorted(rows, key=lambda row: (-row.stats["f1_macro"][0], row.label))


def _cell(mean: float, std: Optional[float]) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _caption(rows: Sequence[Row], split: str) -> str:
    selected: Dict[str, int] = {}
    for run in (run for row in rows for run in row.runs):
        key = run.metrics.get("selected_by", "unknown")
        selected[key] = selected.get(key, 0) + 1
    kept = "; ".join(f"{name} ({count} runs)" for name, count in selected.items()) if len(selected) > 1 else next(iter(selected))
    return (f"{split} split, mean ± sample std over seeds (n runs per row); "
            f"numbers are from the kept weights, selected by: {kept}.")


def _provenance(rows: Sequence[Row]) -> List[str]:
    lines = ["Runs:", ""]
    for row in rows:
        folders = ", ".join(f"{run.path} (seed {run.config['train'].get('seed')}, epoch {run.metrics.get('kept_epoch')})"
                            for run in row.runs)
        lines.append(f"- {row.label}: {folders}")
    return lines


def to_markdown(rows: Sequence[Row], split: str = "test") -> str:
    """The caption, the table and which run folders each row folds."""
    header = ["configuration", "n", *(title for _, title in METRICS)]
    lines = [_caption(rows, split), "", "| " + " | ".join(header) + " |",
             "|:--|--:|" + "--:|" * len(METRICS)]
    for row in rows:
        cells = [row.label, str(row.n), *(_cell(*row.stats[key]) for key, _ in METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + _provenance(rows)) + "\n"


def draw_chart(rows: Sequence[Row], path: Path, split: str = "test") -> None:
    """Accuracy and F1 macro per row as horizontal bars, best row on top, error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = (("accuracy", "accuracy"), ("f1_macro", "F1 macro"))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.55 * len(rows)))
    positions = range(len(rows))[::-1]  # the first (best) row at the top
    for offset, (key, title) in zip((0.2, -0.2), shown):
        means = [row.stats[key][0] for row in rows]
        stds = [row.stats[key][1] if row.n > 1 else float("nan") for row in rows]  # nan: no error bar for one run
        ax.barh([p + offset for p in positions], means, height=0.4, xerr=stds, capsize=3, label=title)
    lows = [row.stats[key][0] - (row.stats[key][1] or 0.0) for row in rows for key, _ in shown]
    ax.set_xlim(max(0.0, (min(lows) - 0.05) // 0.05 * 0.05), 1.0)  # zoom in: the differences are a few points
    ax.set_yticks(list(positions), [f"{row.label}  (n={row.n})" for row in rows])
    ax.set_xlabel(f"{split} score (kept weights)")
    ax.legend(loc="best")
    ax.set_title("mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    save_png_atomic(fig, path)
    plt.close(fig)


def build_parser() -> Parser:
    parser = Parser(prog="python -m kd.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or folders of run folders")
    parser.add_argument("--output", default="report.md", help="Markdown file to write (default: report.md)")
    parser.add_argument("--chart", default=None, help="PNG bar chart to write (default: the --output path with .png)")
    parser.add_argument("--split", default="test", choices=("test", "val"), help="which split's metrics to compare")
    parser.add_argument("--leaderboard", action="store_true",
                        help="the leaderboard instead: differences from the student baseline with 95%% intervals, step cost, time, hardware")
    parser.add_argument("--baseline", metavar="LABEL", help="with --leaderboard: the row to compare with (default: the one default student row)")
    return parser


@main_guard
def main(argv: Optional[Sequence[str]] = None) -> None:  # returns None: the console script exits with main()'s value
    args = build_parser().parse_args(argv)
    rows = table_rows(load_runs(args.run_dirs), args.split)
    output = Path(args.output)
    chart = Path(args.chart) if args.chart else output.with_suffix(".png")
    if args.leaderboard:
        from kd import ranking

        baseline = ranking.pick_baseline(rows, args.baseline)
        entries = ranking.entries(rows, baseline, args.split)
        tuned = ranking.tuned_markdown(entries, args.split)
        markdown = (ranking.to_markdown(entries, baseline, args.split) + (f"\n{tuned}" if tuned else "")
                    + "\n" + "\n".join(_provenance(rows)) + "\n")
        write_text_atomic(output, markdown)
        ranking.draw(entries, baseline, chart, args.split)
    else:
        markdown = to_markdown(rows, args.split)
        write_text_atomic(output, markdown)
        draw_chart(rows, chart, args.split)
    print(markdown, end="")
    print(f"wrote {output} and {chart}", file=sys.stderr)


if __name__ == "__main__":
    main()
