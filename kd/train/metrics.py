"""Classification metrics as an `evaluate.Metric` defined here (the Hub's `evaluate.load`
needs the network): accuracy, per-class precision/recall/F1/support, macro and weighted
averages. Compute it once, on predictions gathered from every process."""

from typing import Dict, List, Optional, Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy, per-class precision/recall/F1/support, and their macro and weighted averages."
_KWARGS = """
Args:
    predictions: predicted class ids.
    references: true class ids.
    num_classes: number of classes (classes absent from both still count in the macro mean).
    class_names: optional names for the per-class table.
Returns:
    accuracy, precision_macro, recall_macro, f1_macro, precision_weighted, recall_weighted,
    f1_weighted, per_class {name: {precision, recall, f1, support}}, num_samples,
    confusion_matrix (rows: true class, columns: predicted class, counts; as scikit-learn's).
"""


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    # scikit-learn's zero_division=0: an undefined ratio counts as 0
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


class ClassificationReport(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(
        self,
        predictions: Sequence[int],
        references: Sequence[int],
        num_classes: Optional[int] = None,
        class_names: Optional[List[str]] = None,
    ) -> Dict:
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if num_classes is None:
            num_classes = len(class_names) if class_names else int(max(predictions.max(), references.max())) + 1
        class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        confusion = np.bincount(references * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)
        true_positive = np.diag(confusion).astype(np.float64)
        support = confusion.sum(1)
        precision = _safe_divide(true_positive, confusion.sum(0))
        recall = _safe_divide(true_positive, support)
        f1 = _safe_divide(2 * precision * recall, precision + recall)
        weights = support / max(support.sum(), 1)
        return {
            "accuracy": float(true_positive.sum() / max(len(references), 1)),
            "precision_macro": float(precision.mean()),
            "recall_macro": float(recall.mean()),
            "f1_macro": float(f1.mean()),
            "precision_weighted": float((precision * weights).sum()),
            "recall_weighted": float((recall * weights).sum()),
            "f1_weighted": float((f1 * weights).sum()),
            "num_samples": int(len(references)),
            "confusion_matrix": confusion.tolist(),
            "per_class": {
                name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
            },
        }


def classification_report(predictions, references, class_names: List[str]) -> Dict:
    metric = ClassificationReport(keep_in_memory=True)
    return metric.compute(predictions=predictions, references=references, num_classes=len(class_names), class_names=class_names)


def absent_classes_warning(report: Dict, split: str) -> Optional[str]:
    """One line naming the classes `split` has no image of (None: it has them all). Their F1 is
    0 by scikit-learn's zero_division=0, and the macro means average over every class, so such
    a split pulls f1_macro down by 1/num_classes per class whatever the model does."""
    per_class = report.get("per_class", {})
    absent = [name for name, row in per_class.items() if row["support"] == 0]
    if not absent:
        return None
    return (f"the {split} split has no image of class{'es' if len(absent) > 1 else ''} {', '.join(absent)}: "
            f"{'their' if len(absent) > 1 else 'its'} F1 counts as 0 in the {split} f1_macro, a mean over all {len(per_class)} classes")
