import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from kd.train.metrics import ClassificationReport, classification_report


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    num_classes = 6
    references = rng.integers(0, num_classes, 500)
    # skewed predictions, and class 5 never predicted: exercises zero_division
    predictions = np.where(rng.random(500) < 0.6, references, rng.integers(0, 5, 500))
    names = [f"c{i}" for i in range(num_classes)]
    report = classification_report(predictions, references, names)
    assert report["accuracy"] == pytest.approx(accuracy_score(references, predictions), abs=1e-9)
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(references, predictions, average=average, zero_division=0)
        assert report[f"precision_{average}"] == pytest.approx(p, abs=1e-9)
        assert report[f"recall_{average}"] == pytest.approx(r, abs=1e-9)
        assert report[f"f1_{average}"] == pytest.approx(f, abs=1e-9)
    p, r, f, s = precision_recall_fscore_support(references, predictions, labels=range(num_classes), zero_division=0)
    for i, name in enumerate(names):
        row = report["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p[i], r[i], f[i], s[i]), abs=1e-9)
    assert report["num_samples"] == 500


def test_metric_accumulates_batches_like_evaluate_metrics():
    metric = ClassificationReport(keep_in_memory=True)
    metric.add_batch(predictions=[0, 1, 1], references=[0, 1, 0])
    metric.add_batch(predictions=[2], references=[2])
    result = metric.compute(num_classes=3)
    assert result["accuracy"] == pytest.approx(0.75) and result["num_samples"] == 4


def test_confusion_matrix_counts_true_rows_predicted_columns():
    # true:      0  0  0  1  1  2  2  2
    # predicted: 0  0  1  1  2  2  2  0
    report = classification_report([0, 0, 1, 1, 2, 2, 2, 0], [0, 0, 0, 1, 1, 2, 2, 2], ["a", "b", "c"])
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]


def test_confusion_matrix_expands_back_to_its_pairs():
    from kd.train.tracking import expand_confusion_matrix

    y_true, preds = expand_confusion_matrix([[2, 1], [0, 3]])
    assert (y_true, preds) == ([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1])
    assert classification_report(preds, y_true, ["a", "b"])["confusion_matrix"] == [[2, 1], [0, 3]]
