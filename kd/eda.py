"""A first look at a dataset before training on it: split sizes, images per class in each
split, the channel statistics the models will be normalised with, and a grid of samples.

    python -m kd.eda --dataset PATH_OR_HUB_ID [--output-dir DIR] [--per-class 8]
                     [--image-column C] [--label-column C] [--test-split NAME] [--image-size N]
"""

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from kd.config import Parser
from kd.data import HUB_DATASET, CifarData, Layout, default_dataset, Split, load_cifar
from kd.errors import UsageError, main_guard
from kd.util.files import write_json_atomic
from kd.train.plots import save_png_atomic

SPLITS = ("train", "test")


def class_counts(split: Split, num_classes: int) -> List[int]:
    return torch.bincount(split.labels, minlength=num_classes).tolist()


def summarize(data: CifarData, dataset: str) -> Dict:
    """What the command prints, as JSON-ready data."""
    splits = {name: getattr(data, name) for name in SPLITS}
    return {
        "dataset": dataset,
        "image_column": data.image_column,
        "label_column": data.label_column,
        "test_split": data.test_split,  # the dataset's split shown as "test"
        "notes": data.notes,
        "image_shape": list(data.train.images.shape[1:]),
        "class_names": data.class_names,
        "split_sizes": {name: len(split) for name, split in splits.items()},
        "class_counts": {name: dict(zip(data.class_names, class_counts(split, data.num_classes))) for name, split in splits.items()},
        "train_mean": list(data.mean),  # per channel, pixels scaled to [0, 1]: what the models are normalised with
        "train_std": list(data.std),
    }


def report(summary: Dict) -> str:
    names = summary["class_names"]
    width = max(len("class"), *map(len, names))
    shape = "x".join(map(str, summary["image_shape"]))
    lines = [f"dataset {summary['dataset']}: {len(names)} classes, {shape} images",
             f"images from column {summary['image_column']!r}, labels from {summary['label_column']!r}; test is split {summary['test_split']!r}",
             *(f"note: {note}" for note in summary["notes"]),
             "split sizes: " + ", ".join(f"{name} {size}" for name, size in summary["split_sizes"].items()),
             f"{'class':<{width}} " + " ".join(f"{name:>8}" for name in SPLITS)]
    lines += [f"{label:<{width}} " + " ".join(f"{summary['class_counts'][split][label]:>8}" for split in SPLITS) for label in names]
    lines.append("train channel mean: " + " ".join(f"{v:.4f}" for v in summary["train_mean"]))
    lines.append("train channel std:  " + " ".join(f"{v:.4f}" for v in summary["train_std"]))
    return "\n".join(lines)


def sample_grid(split: Split, num_classes: int, per_class: int) -> torch.Tensor:
    """One row per class of its first `per_class` training images (blank where a class has
    fewer), as one uint8 H x W x C image."""
    channels, height, width = split.images.shape[1:]
    grid = torch.full((num_classes, per_class, channels, height, width), 255, dtype=torch.uint8)
    for label in range(num_classes):
        images = split.images[split.labels == label][:per_class]
        grid[label, : len(images)] = images
    return grid.permute(0, 3, 1, 4, 2).reshape(num_classes * height, per_class * width, channels)


def plot_samples(split: Split, class_names: Sequence[str], per_class: int, path: Path) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    grid = sample_grid(split, len(class_names), per_class)
    height = split.images.shape[2]
    figure = Figure(figsize=(2 + 0.6 * per_class, 0.6 * len(class_names)), layout="constrained")
    axes = figure.subplots()
    axes.imshow(grid.squeeze(-1).numpy(), cmap="gray" if grid.shape[-1] == 1 else None, interpolation="nearest")
    axes.set_yticks([height * (i + 0.5) for i in range(len(class_names))], labels=class_names)
    axes.set_xticks([])
    axes.set_title(f"first {per_class} training images per class")
    return save_png_atomic(figure, path)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m kd.eda", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dataset", default=default_dataset(), help=f"Hub id or local folder (default: $KD_DATASET or {HUB_DATASET})")
    parser.add_argument("--output-dir", default="outputs/eda", help="where samples.png and eda.json go (default: outputs/eda)")
    parser.add_argument("--per-class", type=int, default=8, help="sample images shown per class (default: 8)")
    parser.add_argument("--image-column", help="the image column (default: the only Image column)")
    parser.add_argument("--label-column", help="the label column (default: the only ClassLabel column)")
    parser.add_argument("--test-split", help="the split shown as test (default: the first of test, validation, valid)")
    parser.add_argument("--image-size", type=int, help="resize every image to N x N when decoding (images of several sizes need it)")
    return parser


@main_guard
def explore(argv: Optional[Sequence[str]] = None) -> Dict:
    """The command line's work; returns the summary written to eda.json."""
    args = build_parser().parse_args(argv)
    if args.per_class < 1:
        raise UsageError(f"--per-class must be at least 1, got {args.per_class}")
    if args.image_size is not None and args.image_size < 1:
        raise UsageError(f"--image-size must be positive, got {args.image_size}")
    layout = Layout(args.image_column, args.label_column, args.test_split, args.image_size)
    data = load_cifar(args.dataset, val_size=0, layout=layout)  # the whole train split: the look is at the data, not a run's share of it
    summary = summarize(data, args.dataset)
    print(report(summary))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "eda.json", summary)
    samples = plot_samples(data.train, data.class_names, args.per_class, out / "samples.png")
    print(f"wrote {out / 'eda.json'} and {samples}")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:  # None: the console script exits with main()'s value
    explore(argv)


if __name__ == "__main__":
    main()
