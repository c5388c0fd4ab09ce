"""The confusion-matrix picture of a run folder, and --overwrite removing it with the rest."""

from kd.train import runner
from kd.train.plots import plot_confusion_matrix


def test_confusion_matrix_png_is_written_and_cleared_by_overwrite(tmp_path):
    path = plot_confusion_matrix([[5, 1, 0], [0, 4, 2], [1, 0, 6]], ["cat", "dog", "ship"], tmp_path / "confusion_matrix.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "notes.txt").write_text("not a run file")
    runner.clear_old_run(tmp_path)  # what --overwrite does before a new run
    assert not path.exists() and (tmp_path / "notes.txt").exists()
