"""Finished run folders read back: each run's config and metrics checked for what the reports
read, and the runs folded into rows, one per configuration (kd.lab.report, kd.lab.ranking)."""

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from kd.config import with_defaults
from kd.errors import UsageError

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


def run_settings(run: Run) -> Dict:
    """Everything that makes two runs different experiments; the seed and run infrastructure
    (output folder, precision, trackers) are left out."""
    config = run.config
    settings = {k: v for k, v in with_defaults("train", config["train"]).items() if k not in NOT_SETTINGS}
    settings.update((with_defaults("distill", config.get("distill")) or {}).items())  # older runs: today's defaults
    settings["dataset"] = config.get("run", {}).get("dataset")
    if "teacher" in config:
        settings["teacher"] = _teacher_model(config["teacher"])
    return settings


def fmt_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def _split_family(family: str, runs: List[Run]) -> List[Row]:
    settings = [run_settings(run) for run in runs]
    keys = sorted({k for s in settings for k in s})
    varying = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
    groups: Dict[str, List[Run]] = {}
    for run, setting in zip(runs, settings):
        suffix = ", ".join(f"{SHORT_NAMES.get(k, k)}={fmt_value(setting.get(k))}" for k in varying)
        groups.setdefault(f"{family} {suffix}".strip(), []).append(run)
    return [Row(label, members) for label, members in groups.items()]


def split_metrics(run: Run, split: str) -> Dict:
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
            values = [float(split_metrics(run, split)[key]) for run in row.runs]
            row.stats[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)
    return sorted(rows, key=lambda row: (-row.stats["f1_macro"][0], row.label))


def cell(mean: float, std: Optional[float]) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"
