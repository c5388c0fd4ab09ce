"""The leaderboard of kd.report on run folders written by hand (as tests/test_report.py does):
Welch intervals against hand-computed values, step cost and time from history.jsonl, default
and tuned rows, hardware marks."""

import json
import math

import pytest

from kd.lab import ranking, report, stats
from kd.errors import UsageError
from test_report import DISTILL, write_run


def test_welch_interval_equal_variances_hand_computed():
    # means 0.78 and 0.72, both variances 4e-4 with n = 3: se = sqrt(2 * 4e-4 / 3) = 0.0163299,
    # Welch dof = (2v/3)^2 / (2 (v/3)^2 / 2) = 4, t(0.975, 4) = 2.776445 (tables): half width 0.0453390
    d = stats.welch_interval([0.76, 0.78, 0.80], [0.70, 0.72, 0.74])
    assert d.dof == pytest.approx(4.0)
    assert (d.mean, d.low, d.high) == pytest.approx((0.06, 0.06 - 0.0453390, 0.06 + 0.0453390), abs=1e-6)


def test_welch_interval_unequal_samples_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [0.81, 0.79, 0.84, 0.80], [0.70, 0.75]
    expected = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    d = stats.welch_interval(a, b)
    # Welch-Satterthwaite by hand: s_a^2 = (0 + 4e-4 + 9e-4 + 1e-4) / 3, s_b^2 = 2 * 0.025^2 / 1
    share_a, share_b = 0.0014 / 3 / 4, 0.00125 / 2
    assert d.dof == pytest.approx((share_a + share_b) ** 2 / (share_a**2 / 3 + share_b**2 / 1), rel=1e-9)
    assert (d.low, d.high) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_welch_needs_two_values_each_side_and_handles_no_spread():
    assert stats.welch_interval([0.7], [0.6, 0.7]) is None
    d = stats.welch_interval([0.7, 0.7], [0.6, 0.6])
    assert (d.mean, d.low, d.high) == pytest.approx((0.1, 0.1, 0.1)) and math.isinf(d.dof)


def with_history(folder, images_per_s, epoch_time_s, epochs=3, device="cpu (AMD EPYC, 1 threads)", precision="no", tags=(), old=False):
    """Add what the leaderboard reads beyond the report: history.jsonl and the hardware. `old`:
    a history from before epoch_time_s, with training time only (half the epoch's here)."""
    times = {"train_time_s": epoch_time_s} if old else {"train_time_s": epoch_time_s / 2, "epoch_time_s": epoch_time_s}
    (folder / "history.jsonl").write_text("".join(
        json.dumps({"epoch": e, "images_per_s": images_per_s * (0.5 if e == 1 else 1.0), **times}) + "\n"
        for e in range(1, epochs + 1)))
    config = json.loads((folder / "run_config.json").read_text())
    config.update(mixed_precision=precision, device=device)
    config["run"]["tags"] = list(tags)
    (folder / "run_config.json").write_text(json.dumps(config))


@pytest.fixture
def board_root(tmp_path):
    root = tmp_path / "board"
    teacher = write_run(root / "teacher", (0.85, 0.85, 0.85, 0.85), model="cifar_resnet20", role="teacher")
    with_history(teacher, 100, 120)
    for seed, f1 in enumerate((0.70, 0.72, 0.74)):
        with_history(write_run(root / "student" / f"s{seed}", (f1, f1, f1, f1), seed=seed, role="student"), 200, 60)
    for seed, f1 in enumerate((0.76, 0.78, 0.80)):
        with_history(write_run(root / "logits" / "default" / f"s{seed}", (f1, f1, f1, f1), seed=seed, distill=DISTILL,
                               teacher=str(teacher)), 100, 90)
    tuned = {**DISTILL, "temperature": 2.5, "alpha": 0.75}
    with_history(write_run(root / "logits" / "tuned" / "s0", (0.81, 0.81, 0.81, 0.81), distill=tuned, teacher=str(teacher)),
                 50, 100, device="cuda (NVIDIA H100)", precision="bf16", tags=("tuned",), old=True)
    return root


def test_leaderboard_rows(board_root, tmp_path, capsys):
    output = tmp_path / "board.md"
    report.main([str(board_root), "--leaderboard", "--output", str(output)])
    markdown = output.read_text()
    assert capsys.readouterr().out == markdown
    board = markdown[:markdown.index("Tuned against default")]  # the tables after it name the same rows
    rows = {line.split(" | ")[0][2:]: line for line in board.splitlines() if line.startswith("| ") and " | " in line}
    assert rows["student (cifar_resnet8)"] == ("| student (cifar_resnet8) | lr=0.1, weight_decay=0.0005, label_smoothing=0 | 3 | "
                                                "0.7200 ± 0.0200 | 0.7200 ± 0.0200 | baseline | baseline | 1.00× | 3m00s | fp32, cpu (AMD EPYC, 1 threads) |")
    # 0.06 ± 0.0453390 (see the hand computation above); half the baseline's images/s: 2x the step cost; 3 x 90 s
    assert rows["distill logits (cifar_resnet8)"] == ("| distill logits (cifar_resnet8) | T=4, alpha=0.9 | 3 | 0.7800 ± 0.0200 | 0.7800 ± 0.0200 | "
                                                      "+0.0600 [+0.0147, +0.1053] | +0.0600 [+0.0147, +0.1053] | 2.00× | 4m30s | "
                                                      "fp32, cpu (AMD EPYC, 1 threads) |")
    assert rows["distill logits (cifar_resnet8) tuned"] == ("| distill logits (cifar_resnet8) tuned | T=2.5, alpha=0.75 | 1 | 0.8100 | 0.8100 | "
                                                            "n/a (n < 2) | n/a (n < 2) | 4.00× | 5m00s | ≠ bf16, cuda (NVIDIA H100) |")
    assert (tmp_path / "board.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_tuned_row_is_set_against_its_own_default_row(board_root, tmp_path, capsys):
    """The tuned logits row (T=2.5, alpha=0.75; seeds 0 and 1) minus the default logits row, not
    the logit-standardized one, which differs outside the search space (the fixture's runs
    predate the flag, so they count as its default: LS=False); a tuned row with no default row (dkd) gives no line."""
    tuned = {**DISTILL, "temperature": 2.5, "alpha": 0.75}
    write_run(board_root / "logits" / "tuned" / "s1", (0.83,) * 4, seed=1, distill=tuned, teacher=str(board_root / "teacher"))
    with_history(board_root / "logits" / "tuned" / "s1", 50, 100, device="cuda (NVIDIA H100)", precision="bf16", tags=("tuned",))
    for seed in (0, 1):  # a second default logits row, trained with logit standardization
        write_run(board_root / "logits-ls" / f"s{seed}", (0.79,) * 4, seed=seed, teacher=str(board_root / "teacher"),
                  distill={**DISTILL, "logit_standardization": True})
        with_history(write_run(board_root / "dkd" / f"s{seed}", (0.75,) * 4, seed=seed, teacher=str(board_root / "teacher"),
                               distill={**DISTILL, "mode": "dkd"}), 100, 90, tags=("tuned",))
    report.main([str(board_root), "--leaderboard", "--output", str(tmp_path / "board.md")])
    markdown = (tmp_path / "board.md").read_text()
    assert capsys.readouterr().out == markdown
    table = markdown[markdown.index("Tuned against default, test split:"):markdown.index("Runs:")].splitlines()
    expected = stats.welch_interval([0.81, 0.83], [0.76, 0.78, 0.80])  # mean +0.04
    cell = f"{expected.mean:+.4f} [{expected.low:+.4f}, {expected.high:+.4f}]"
    assert table[2:] == ["| method | default | tuned | Δ accuracy [95% CI] | Δ F1 macro [95% CI] |", "|:--|:--|:--|--:|--:|",
                         "| distill logits (cifar_resnet8) LS=False | T=4, alpha=0.9 (seeds 0, 1, 2) | "
                         f"T=2.5, alpha=0.75 (seeds 0, 1) | {cell} | {cell} |",
                         ""]
    assert expected.mean == pytest.approx(0.04) and expected.low < 0 < expected.high


def test_a_standardized_row_names_the_settings_it_trained_with(tmp_path, capsys):
    """--logit-standardization trains logits with ls_temperature, ls_ce_weight and ls_kd_weight in
    place of T and alpha: its row shows those, not the T and alpha that did nothing."""
    root = tmp_path / "board"
    teacher = write_run(root / "teacher", (0.85,) * 4, model="cifar_resnet20", role="teacher")
    for seed in (0, 1):
        write_run(root / "student" / f"s{seed}", (0.70 + seed / 100,) * 4, seed=seed, role="student")
    plain = {**DISTILL, "logit_standardization": False, "ls_temperature": 2.0, "ls_ce_weight": 0.1, "ls_kd_weight": 9.0}
    write_run(root / "logits" / "s0", (0.78,) * 4, distill=plain, teacher=str(teacher))
    write_run(root / "logits-ls" / "s0", (0.79,) * 4, distill={**plain, "logit_standardization": True}, teacher=str(teacher))
    report.main([str(root), "--leaderboard", "--output", str(tmp_path / "board.md")])
    settings = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in capsys.readouterr().out.splitlines() if line.startswith("| distill")}
    assert settings == {"distill logits (cifar_resnet8) LS=True": "ls_temperature=2, ls_ce_weight=0.1, ls_kd_weight=9",
                        "distill logits (cifar_resnet8) LS=False": "T=4, alpha=0.9"}


def test_a_collapsed_row_does_not_squeeze_the_others_out_of_the_plot(board_root, tmp_path):
    """DKD at its paper weights diverges on the cpu budget (Δ F1 about -0.7); the plot spans the
    other rows' intervals and zero, and pins the collapsed row to the left edge."""
    points = [(0.036, 0.035, 0.037), (-0.72, -0.75, -0.69), (0.025, -0.017, 0.067), (0.01, 0.01, 0.01)]
    low, high = ranking.x_span(points)
    assert -0.69 < low < -0.017 and 0.067 < high < 0.1  # the others' intervals inside, the collapsed one outside
    assert ranking.x_span([point for point in points if point[0] > -0.1]) is None  # nothing collapsed: no clipping
    assert ranking.x_span([(-0.5, -0.6, -0.4)]) is None  # every row collapsed: nothing to pin against
    for seed, f1 in enumerate((0.10, 0.12)):  # a diverged method: the PNG is still written
        with_history(write_run(board_root / "dkd" / f"s{seed}", (f1, f1, f1, f1), seed=seed,
                               distill={**DISTILL, "mode": "dkd"}, teacher=str(board_root / "teacher")), 100, 90)
    report.main([str(board_root), "--leaderboard", "--output", str(tmp_path / "board.md")])
    assert (tmp_path / "board.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leaderboard_needs_one_baseline(board_root):
    rows = report.table_rows(report.load_runs([board_root / "logits"]))
    with pytest.raises(UsageError, match="needs one student baseline row, found none"):
        ranking.pick_baseline(rows)
    assert ranking.pick_baseline(rows, "distill logits (cifar_resnet8)").label == "distill logits (cifar_resnet8)"
    with pytest.raises(UsageError, match="--baseline 'nope' is no row"):
        ranking.pick_baseline(rows, "nope")


def test_driver_appends_the_searches_with_their_trial_counts(board_root, tmp_path, capsys):
    from kd.lab import leaderboard

    out = tmp_path / "lb"
    out.mkdir()
    board_root.rename(out / "runs")
    (out / "tune" / "logits").mkdir(parents=True)
    (out / "tune" / "logits" / "tune.json").write_text(json.dumps(
        {"trials": 3, "pruned": 1, "best_params": {"temperature": 2.5}, "best_val_f1_macro": 0.81234, "grid": {"temperature": [2.5, 4.0, 8.0]}}))
    (out / "tune" / "student").mkdir(parents=True)
    (out / "tune" / "student" / "tune.json").write_text(json.dumps(
        {"trials": 12, "pruned": 4, "best_params": {"lr": 0.3, "weight_decay": 0.001}, "best_val_f1_macro": 0.75, "grid": None}))
    trial = out / "tune" / "logits" / "trials" / "000"
    trial.mkdir(parents=True)
    (trial / "history.jsonl").write_text("".join(json.dumps({"epoch": e, "epoch_time_s": 50.0}) + "\n" for e in (1, 2)))  # pruned at 2
    (out / "tune" / "logits" / "trials" / "001").mkdir()  # interrupted before its first epoch: no history, not counted
    (out / "tune" / "logits" / "best").mkdir()  # not a trial
    (out / "tune" / "logits" / "best" / "history.jsonl").write_text(json.dumps({"epoch": 1, "epoch_time_s": 999.0}) + "\n")
    leaderboard.write_leaderboard(out, ["supervised", "logits", "dkd"], parallel=2)
    markdown = (out / "leaderboard.md").read_text()
    assert "| distill logits (cifar_resnet8) tuned |" in markdown  # the report's table comes first
    searches = markdown[markdown.index("Searches (`kd.tune`;"):]
    assert searches in capsys.readouterr().out
    # logits' default run on seed 0 kept validation F1 0.76; the student's default runs are not where the driver puts them
    assert searches.splitlines()[4:8] == ["| student | 12 (4) | TPE draws | lr=0.3, weight_decay=0.001 | 0.7500 | n/a |",
                                          "| logits | 3 (1) | grid temperature 2.5, 4, 8 | temperature=2.5 | 0.8123 | +0.0523 |",
                                          "| dkd | 0 | – | – | – | – |", ""]
    # teacher 3 x 120 s, students 3 x 3 x 60, logits 3 x 3 x 90, tuned logits 3 x 100 (training time: an old history),
    # the trial 2 x 50: 2110 s, over 2 slots 1055 s
    assert markdown.endswith("\nCompute: 8 runs and 1 search trial, 35m10s of epochs' wall time summed (runs 33m30s, trials 1m40s); "
                             "with 2 at a time, about 17m35s of driver wall time.\n")


def test_plain_loop_against_ours_with_the_welch_interval():
    # the hand-computed case above: plain - ours = -0.06, half width 0.0453390 (accuracy); F1 equal on both sides
    settings = {"model": "cifar_resnet8", "epochs": 10, "batch_size": 256, "lr": 0.4, "precision": "fp32"}
    ours = [{"test": {"accuracy": a, "f1_macro": 0.7}} for a in (0.76, 0.78, 0.80)]
    plain = [{"test": {"accuracy": a, "f1_macro": 0.7}, "settings": settings} for a in (0.70, 0.72, 0.74)]
    lines = ranking.plain_loop_markdown(ours, plain).splitlines()
    assert "(`scripts/plain_loop.py`, written apart from kd's data and loop: cifar_resnet8, 10 epochs, batch 256, lr 0.4, fp32;" in lines[0]
    assert lines[4:] == ["| kd (`train_student.py`, the student row) | 3 | 0.7800 ± 0.0200 | 0.7000 ± 0.0000 |",
                         "| plain PyTorch (`scripts/plain_loop.py`) | 3 | 0.7200 ± 0.0200 | 0.7000 ± 0.0000 |",
                         "| plain − kd [95% CI] | | -0.0600 [-0.1053, -0.0147] | +0.0000 [+0.0000, +0.0000] |"]
    one = ranking.plain_loop_markdown(ours, plain[:1]).splitlines()
    assert one[5] == "| plain PyTorch (`scripts/plain_loop.py`) | 1 | 0.7000 | 0.7000 |" and one[6].endswith("| n/a (n < 2) | n/a (n < 2) |")


@pytest.mark.parametrize("split", ["test", "val"])
def test_the_plot_names_the_split_it_compares(split, board_root, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(ranking, "save_png_atomic", lambda figure, path: drawn.append(figure) or path)
    report.main([str(board_root), "--leaderboard", "--split", split, "--output", str(tmp_path / "board.md")])
    assert drawn[0].axes[0].get_xlabel() == f"Δ {split} F1 macro from student (cifar_resnet8) (95% Welch interval)"
