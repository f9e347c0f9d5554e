"""The per-epoch validation retrieval scores that pick the best epoch (train.monitor)."""

import numpy as np
import pytest

from facejax.config import load_config
from facejax.train import checkpoint as ckpt_lib
from facejax.train.loop import retrieval_scores


def _unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_map_r_and_top1_by_hand():
    # Gallery: class 0 at g0, g2; class 1 at g1, g3. Query 0 (class 0) ranks g0, g1, g2, g3:
    # R = 2, AP@R = (P@1 * 1 + P@2 * 0) / 2 = 0.5. Query 1 (class 1) ranks g3, g2, g1, g0: also
    # 0.5. Query 2 (class 2) has no relevant image: a Top-1 miss, left out of mAP@R.
    g = _unit([[1, 0.1], [1, 0.3], [0.5, 1], [0, 1]])
    q = _unit([[1, 0], [0, 1], [1, 1]])
    out = retrieval_scores(q, [0, 1, 2], g, [0, 1, 0, 1])
    assert out["val_map_r"] == pytest.approx(0.5)
    assert out["val_top1"] == pytest.approx(2 / 3)
    # A perfect ranking: the score that val_top1 cannot tell from the first one.
    g2 = _unit([[1, 0.1], [0.2, 1], [1, 0.2], [0, 1]])
    better = retrieval_scores(q[:2], [0, 1], g2, [0, 1, 0, 1])
    assert better["val_top1"] == 1.0 and better["val_map_r"] == pytest.approx(1.0)


def test_the_face_config_monitors_map_r():
    cfg = load_config("configs/dlib_resnet.py")
    assert cfg.train.monitor == "val_map_r" and ckpt_lib.MONITORS["val_map_r"] == "max"
