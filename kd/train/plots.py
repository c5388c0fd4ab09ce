"""Training curves of a run (history.jsonl) as one PNG: the loss terms, the validation
metrics and the learning rate, per epoch; the test split's confusion matrix; and a search's
trials (kd.tune)."""

import os
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

VAL_METRICS = ("val_accuracy", "val_f1_macro")  # the two numbers the kept weights are judged by
Series = Tuple[List[int], List[float]]  # (epochs, values)


def _series(history: Sequence[Dict], key: str) -> Series:
    """The epochs where `key` was recorded and its values (a resumed or partial history may
    lack a key in some epochs; those epochs are skipped, not drawn as zero)."""
    points = [(record["epoch"], record[key]) for record in history if isinstance(record.get(key), (int, float))]
    return [epoch for epoch, _ in points], [value for _, value in points]


def curves(history: Sequence[Dict]) -> Dict[str, Dict[str, Series]]:
    """What to draw, panel by panel: {panel title: {label: (epochs, values)}}; panels with
    nothing to show are left out."""
    loss_keys = sorted({key for record in history for key in record if key.startswith("loss")}, key=lambda k: (k == "loss", k))
    panels = {
        "loss": {key: _series(history, key) for key in loss_keys},
        "validation": {key: _series(history, key) for key in VAL_METRICS},
        "learning rate": {"lr": _series(history, "lr")},
    }
    return {title: {label: s for label, s in lines.items() if s[0]} for title, lines in panels.items()
            if any(s[0] for s in lines.values())}


def plot_history(history: Sequence[Dict], path) -> Path:
    """Write the curves of `history` (one dict per epoch, as in history.jsonl) to `path` (PNG),
    atomically: a reader never sees a half-written image."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    panels = curves(history)
    if not panels:
        raise ValueError("history has no epoch with a loss, validation metric or lr to plot")
    figure = Figure(figsize=(4.5 * len(panels), 3.6), layout="constrained")
    for axes, (title, lines) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for label, (epochs, values) in lines.items():
            style = "--" if label == "loss" else "-"  # the total, dashed, over the terms it sums
            axes.plot(epochs, values, style, marker="o", markersize=3, label=label)  # markers: a 1-epoch run still shows a point
        axes.set(title=title, xlabel="epoch")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return save_png_atomic(figure, Path(path))


def save_png_atomic(figure, path: Path) -> Path:
    """Save a matplotlib figure as PNG: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(handle)
    try:
        figure.savefig(tmp, format="png", dpi=110)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


COUNTED_CLASSES = 20  # up to this many classes each cell shows its count
NAMED_CLASSES = 100  # up to this many the axes name every class; above, they number them
CONFUSION_INCHES = 16  # the largest side: a figure that grows with the classes would take minutes and GBs for 1,000


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path, title: str = "confusion matrix (test)") -> Path:
    """The counts as a heat map, rows the true class and columns the predicted one; the colour
    is the share of the true class's images (recall on the diagonal), so classes of different
    sizes read alike. Up to COUNTED_CLASSES classes each cell shows its count, up to
    NAMED_CLASSES the axes name each class; the figure's side stops at CONFUSION_INCHES."""
    import numpy as np
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype=np.int64)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    classes = len(class_names)
    size = min(2.5 + 0.55 * classes, CONFUSION_INCHES)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if classes <= COUNTED_CLASSES:
        for (row, column), count in np.ndenumerate(counts):
            axes.text(column, row, str(count), ha="center", va="center", fontsize=7, color="white" if shares[row, column] > 0.5 else "black")
    named = classes <= NAMED_CLASSES
    if named:
        fontsize = min(10, 700 / classes)  # points: 10 for CIFAR-10, 7 for 100 classes on 16 inches
        rotation, align = (45, "right") if classes <= COUNTED_CLASSES else (90, "center")
        axes.set_xticks(range(classes), class_names, rotation=rotation, ha=align, fontsize=fontsize)
        axes.set_yticks(range(classes), class_names, fontsize=fontsize)
    index = "" if named else " (class index)"
    axes.set(xlabel=f"predicted{index}", ylabel=f"true{index}", title=title)
    figure.colorbar(image, ax=axes, label="share of the true class")
    return save_png_atomic(figure, Path(path))


def plot_trials(trials: Sequence, study_name: str, path: Path) -> Path:
    """A search's finished trials (Optuna's FrozenTrial: complete or pruned), as one PNG. Left:
    each trial's final validation F1 (pruned ones at their last report) and the best so far;
    right: the per-epoch validation F1 of every trial, which is what the pruner compares."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.8), layout="constrained")
    by_trial, by_epoch = figure.subplots(1, 2)
    best, best_line = -1.0, []
    for trial in trials:
        complete = trial.state.name == "COMPLETE"
        last = trial.intermediate_values.get(max(trial.intermediate_values, default=0))
        score = trial.value if complete else last
        if score is not None:
            by_trial.plot(trial.number, score, "o" if complete else "x", color="C0" if complete else "grey")
        if complete:
            best = max(best, trial.value)
            best_line.append((trial.number, best))
        epochs = sorted(trial.intermediate_values)
        by_epoch.plot(epochs, [trial.intermediate_values[e] for e in epochs], "-" if complete else ":",
                      color="C0" if complete else "grey", alpha=0.7, marker="o", markersize=2)
    if best_line:
        by_trial.step(*zip(*best_line), where="post", color="C1", label="best so far")
        by_trial.legend(fontsize="small")
    by_trial.set(title=f"{study_name}: trials (x: pruned)", xlabel="trial", ylabel="validation F1 macro")
    by_epoch.set(title="per epoch (dotted: pruned)", xlabel="epoch", ylabel="validation F1 macro")
    for axes in (by_trial, by_epoch):
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
    return save_png_atomic(figure, path)
