"""Compare finished runs: one table row per configuration, seeds folded into mean ± std.

    python -m kd.report runs/teacher-s0 runs/teacher-s1 runs/distill-logits-s0 ...
    python -m kd.report runs/cpu-thin            # a folder of run folders
    python -m kd.report runs/leaderboard --leaderboard   # differences from the student baseline

Rows are keyed by method, model and every train/distill setting except the seed; settings
that differ between runs of one method and model are written into the row's label (T=2)."""

import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from kd.config import Parser  # argparse with one-line errors, like the training scripts
from kd.errors import main_guard
from kd.lab.runs import METRICS, Row, cell, load_runs, table_rows  # noqa: F401  (load_runs: kd.report's API)
from kd.train.plots import save_png_atomic
from kd.util.files import write_text_atomic

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
        cells = [row.label, str(row.n), *(cell(*row.stats[key]) for key, _ in METRICS)]
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
        from kd.lab import ranking

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
