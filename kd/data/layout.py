"""How a dataset is laid out: which column holds the images, which the class labels (and the
class names), which split is read for the final evaluation. Flags name them; without flags
they are found, and an ambiguity is refused in one line that lists the candidates."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from kd.errors import UsageError

IMAGE_COLUMNS = ("img", "image")  # read by name where no column has the Image type
EVAL_SPLITS = ("test", "validation", "valid")  # the first one a dataset has is read for the final evaluation


@dataclass(frozen=True)
class Layout:
    """How to read a dataset: its columns, its evaluation split, the size images are resized to
    (None: as stored, all of one size). None everywhere: found from the dataset."""

    image_column: Optional[str] = None
    label_column: Optional[str] = None
    test_split: Optional[str] = None
    image_size: Optional[int] = None


def eval_split_name(dataset_dict, dataset: str, wanted: Optional[str] = None) -> str:
    """The split read for the final evaluation: `wanted`, else the first of EVAL_SPLITS there is."""
    names = ", ".join(dataset_dict)
    if "train" not in dataset_dict:
        raise UsageError(f"dataset {dataset} has no 'train' split (it has {names})")
    if wanted is not None:
        if wanted not in dataset_dict or wanted == "train":
            raise UsageError(f"--test-split {wanted!r}: dataset {dataset} has no such split other than train (it has {names})")
        return wanted
    found = next((name for name in EVAL_SPLITS if name in dataset_dict), None)
    if found is None:
        raise UsageError(f"dataset {dataset} has no test split (looked for {', '.join(EVAL_SPLITS)}; it has {names}); "
                         "name one with --test-split")
    return found


def _feature_kind(feature) -> str:
    from datasets import ClassLabel, Image as ImageFeature, Value

    if isinstance(feature, ClassLabel):
        return f"ClassLabel of {feature.num_classes}"
    if isinstance(feature, ImageFeature):
        return "Image"
    return feature.dtype if isinstance(feature, Value) else type(feature).__name__


def column_list(features) -> str:
    return ", ".join(f"{name} ({_feature_kind(feature)})" for name, feature in features.items())


def label_like(feature) -> bool:
    """Class labels: a ClassLabel, or plain integers or strings (class names taken from the values)."""
    from datasets import ClassLabel, Value

    return isinstance(feature, ClassLabel) or (isinstance(feature, Value) and (feature.dtype.startswith(("int", "uint")) or "string" in feature.dtype))


def find_columns(features, dataset: str, image_column: Optional[str] = None, label_column: Optional[str] = None) -> Tuple[str, str]:
    """(image column, label column): those named, else the single Image column and the single
    ClassLabel column (a plain `label` column where there is no ClassLabel)."""
    from datasets import ClassLabel, Image as ImageFeature

    columns = column_list(features)

    def chosen(named: Optional[str], found: List[str], kind: str, flag: str) -> str:
        """The column named with `flag`, else the single one found of its kind."""
        if named is not None:
            if named not in features:
                raise UsageError(f"{flag} {named!r}: dataset {dataset} has no such column (its columns: {columns})")
            return named
        if len(found) != 1:
            what = f"no {kind} column" if not found else f"{len(found)} {kind} columns ({', '.join(found)})"
            raise UsageError(f"dataset {dataset} has {what}; name one with {flag} (its columns: {columns})")
        return found[0]

    images = [name for name, f in features.items() if isinstance(f, ImageFeature)] or [c for c in IMAGE_COLUMNS if c in features]
    labels = [name for name, f in features.items() if isinstance(f, ClassLabel)]
    if not labels and "label" in features:  # plain values; a type that holds no labels is refused below
        labels = ["label"]
    image_column = chosen(image_column, images, "image", "--image-column")
    label_column = chosen(label_column, labels, "class-label", "--label-column")
    if not label_like(features[label_column]):
        raise UsageError(f"column {label_column!r} of dataset {dataset} holds {_feature_kind(features[label_column])} values, "
                         "not class labels (a ClassLabel, integers or strings); name another with --label-column")
    return image_column, label_column


def class_labels(dataset_dict, split_names: Sequence[str], column: str, dataset: str) -> Tuple[List[str], Dict[str, torch.Tensor]]:
    """(class names, {split: int64 labels}). A ClassLabel column keeps its names; plain integers
    or strings become classes named by their values, sorted (integers as numbers)."""
    from datasets import ClassLabel

    feature = dataset_dict["train"].features[column]
    values = {name: dataset_dict[name][column] for name in split_names}
    for name, column_values in values.items():
        if None in column_values:
            raise UsageError(f"the {name} split has no label at row {column_values.index(None)} (column {column!r}); "
                             "remove that row or fill it in")
    if isinstance(feature, ClassLabel):
        return list(feature.names), {name: torch.tensor(v, dtype=torch.int64) for name, v in values.items()}
    classes = sorted(set().union(*values.values()))
    index = {value: i for i, value in enumerate(classes)}
    return [str(c) for c in classes], {name: torch.tensor([index[x] for x in v], dtype=torch.int64) for name, v in values.items()}
