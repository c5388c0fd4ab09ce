import pytest
from PIL import Image

from kd.train.plots import curves, plot_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(epoch, validation=True):
    out = {"epoch": epoch, "step": 10 * epoch, "loss_ce": 2.0 / epoch, "loss_kd": 1.0 / epoch, "loss": 3.0 / epoch,
           "lr": 0.1 / epoch, "images_per_s": 1000.0}
    if validation:
        out.update(val_accuracy=0.3 * epoch, val_f1_macro=0.25 * epoch, val_num_samples=32)
    return out


def test_curves_take_every_loss_term_and_validation_metric():
    panels = curves([record(1), record(2, validation=False), record(3)])
    assert list(panels) == ["loss", "validation", "learning rate"]
    assert list(panels["loss"]) == ["loss_ce", "loss_kd", "loss"]  # the terms, then their sum
    assert panels["loss"]["loss_kd"] == ([1, 2, 3], [1.0, 0.5, 1.0 / 3])
    assert panels["validation"]["val_f1_macro"] == ([1, 3], [0.25, 0.75])  # epoch 2 has none: skipped, not zero
    assert panels["learning rate"]["lr"][1] == [0.1, 0.05, 0.1 / 3]


def test_curves_leave_out_what_was_not_recorded():
    panels = curves([record(1, validation=False)])
    assert list(panels) == ["loss", "learning rate"]


def image_size(path):
    with Image.open(path) as image:
        image.verify()  # a truncated or corrupt PNG raises here
        return image.size


@pytest.mark.parametrize("epochs", [1, 3])
def test_plot_history_writes_a_png_atomically(tmp_path, epochs):
    path = plot_history([record(e) for e in range(1, epochs + 1)], tmp_path / "runs" / "curves.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    width, height = image_size(path)
    assert width > 2 * height  # three panels side by side
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temporary file left behind


def test_plot_history_has_one_panel_fewer_without_validation(tmp_path):
    with_val = image_size(plot_history([record(1), record(2)], tmp_path / "a.png"))
    without = image_size(plot_history([record(1, False), record(2, False)], tmp_path / "b.png"))
    assert without[0] < with_val[0] * 0.75 and without[1] == with_val[1]


def test_plot_history_refuses_an_empty_history(tmp_path):
    with pytest.raises(ValueError, match="nothing|no epoch"):
        plot_history([], tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()
