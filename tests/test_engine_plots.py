"""Run plots stay readable: few series per panel with the legend beside it, large validation tiles,
one colour per class shared with `kd-bnn predict`."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from kd_bnn.engine.plots import plot_loss_curves

CLASSES = ("Car", "Pedestrian", "Cyclist", "mAP")


def test_metric_panel_has_one_series_per_class_and_the_legend_beside_it(tmp_path, monkeypatch):
    metrics = [f"{c}/{d}/{r}" for c in CLASSES for d in ("easy", "moderate", "hard") for r in ("R11", "R40")]
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "loss", "det/box", "lr", *metrics])
        w.writerow([1, 3.0, 1.0, 1e-3, *[""] * len(metrics)])
        w.writerow([2, 2.0, 0.8, 5e-4, *np.linspace(10, 40, len(metrics)).round(2)])
    plt = pytest.importorskip("matplotlib.pyplot")
    figs = []
    monkeypatch.setattr("kd_bnn.engine.plots._save", lambda fig, out: figs.append(fig) or out)
    plot_loss_curves(path, tmp_path / "loss.png")
    ax = figs[0].axes[2]
    assert [line.get_label() for line in ax.get_lines()] == list(CLASSES)  # 4 series, not 24
    assert ax.get_xlim()[0] <= 1 and ax.get_xlim()[1] >= 2  # the run's epochs, not one point mid-panel
    legend = ax.get_legend()
    figs[0].canvas.draw()
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # beside the panel, not over it
    plt.close("all")


def test_predict_and_the_validation_grid_share_the_class_colours():
    from kd_bnn.eval.report import class_colour

    cv2 = pytest.importorskip("cv2")
    from kd_bnn.deploy.runtime import draw_detections

    img = np.zeros((40, 60, 3), np.uint8)
    out = draw_detections(img, [(5, 5, 30, 30)], [0.9], [1], ["Car", "Pedestrian"])
    assert tuple(out[5, 15]) == class_colour(1)[::-1]  # BGR of the Pedestrian colour, on the top edge
    assert cv2 is not None
