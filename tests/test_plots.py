"""Training curves: whole-epoch axes (also for 1 epoch), and legends that say which line is the
classifier's accuracy and which is retrieval Top-k."""

import os

import matplotlib.pyplot as plt
import numpy as np

from facejax.train import plots


def _ticks_in_view(ax):
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


def test_a_one_epoch_plot_has_a_whole_epoch_axis():
    history = [dict(epoch=1, train_accuracy=0.05, val_accuracy=0.04, val_top1=0.88)]
    ylabel, what, series = plots.CURVES["accuracy.png"]
    fig, ax = plots.draw_curves(history, ylabel, what, series)
    try:
        # matplotlib's default for one point is 0.96-1.04, with ticks at 0.96, 0.98, ...
        assert ax.get_xlim() == (0.5, 1.5)
        assert _ticks_in_view(ax) == [1.0]
        assert ax.get_xlabel() == "epoch"
    finally:
        plt.close(fig)


def test_curves_say_which_line_is_classifier_accuracy_and_which_retrieval():
    history = [dict(epoch=0, val_accuracy=0.0, val_top1=0.93, val_top5=0.98, val_loss=20.0)]
    history += [dict(epoch=e, train_accuracy=0.05 * e, val_accuracy=0.04 * e, val_top1=0.9,
                     val_top5=0.97, train_loss=3.0 / e, val_loss=4.0 / e) for e in (1, 2, 3)]
    ylabel, what, series = plots.CURVES["accuracy.png"]
    fig, ax = plots.draw_curves(history, ylabel, what, series, title="dlib_resnet")
    try:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["train classifier accuracy", "validation classifier accuracy",
                          "validation retrieval Top-1", "validation retrieval Top-5"]
        assert "classifier accuracy (softmax head) vs retrieval Top-k" in ax.get_title()
        assert ax.get_title().startswith("dlib_resnet\n")
        assert ax.get_xlim() == (-0.5, 3.5)
        ticks = _ticks_in_view(ax)
        assert ticks == [0.0, 1.0, 2.0, 3.0] and all(float(t).is_integer() for t in ticks)
        assert ax.get_xlabel() == "epoch (0 = the starting model)"
        # Epoch 0 (the starting model) is the first point of the retrieval line.
        top1 = ax.get_lines()[labels.index("validation retrieval Top-1")]
        np.testing.assert_array_equal(top1.get_xdata(), [0, 1, 2, 3])
    finally:
        plt.close(fig)
    # Long runs keep whole-number ticks too.
    long = [dict(epoch=e, val_top1=0.5) for e in range(0, 41)]
    fig, ax = plots.draw_curves(long, ylabel, what, series)
    try:
        assert all(float(t).is_integer() for t in _ticks_in_view(ax))
    finally:
        plt.close(fig)


def test_plot_history_writes_both_figures(tmp_path):
    written = plots.plot_history([dict(epoch=1, train_loss=1.0, val_top1=0.5)], str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == ["accuracy.png", "loss.png"]
    assert sorted(os.listdir(tmp_path)) == ["accuracy.png", "loss.png"]
