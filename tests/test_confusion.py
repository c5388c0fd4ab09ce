"""The confusion-matrix picture of a run folder, and --overwrite removing it with the rest."""

from kd.train import runner
from kd.train.plots import plot_confusion_matrix


def test_confusion_matrix_png_is_written_and_cleared_by_overwrite(tmp_path):
    path = plot_confusion_matrix([[5, 1, 0], [0, 4, 2], [1, 0, 6]], ["cat", "dog", "ship"], tmp_path / "confusion_matrix.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "notes.txt").write_text("not a run file")
    runner.clear_old_run(tmp_path)  # what --overwrite does before a new run
    assert not path.exists() and (tmp_path / "notes.txt").exists()


def png_size(path):
    header = path.read_bytes()[16:24]
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


def test_confusion_matrix_of_many_classes_stays_a_picture_of_bounded_size(tmp_path):
    """CIFAR-10's picture is as before (counts in the cells, 990 x 880 px at 110 dpi); 200 classes
    (Tiny ImageNet) once made a 12,375 px square with 40,000 counts: minutes and GBs at the end of a run."""
    import numpy as np

    from kd.train import plots

    assert png_size(plot_confusion_matrix(np.eye(10, dtype=int) * 9, [f"c{i}" for i in range(10)], tmp_path / "ten.png")) == (990, 880)
    side = plots.CONFUSION_INCHES * 110
    many = plot_confusion_matrix(np.eye(200, dtype=int) * 5 + 1, [f"class_{i:03d}" for i in range(200)], tmp_path / "many.png")
    width, height = png_size(many)
    assert width <= side + 110 and height <= side
