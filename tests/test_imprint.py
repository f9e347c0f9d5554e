"""Weight imprinting: the cosine head starts at the normalised class-mean embeddings."""

import os

import numpy as np
import pytest
from flax import nnx
from test_train_loop import CLASSES, TINY, overrides, tiny_idx

from facejax.config import load_config
from facejax.data.augment import preprocess_eval
from facejax.data.prepare import prepare_data
from facejax.errors import ConfigError, DataError
from facejax.models import create_model
from facejax.train import checkpoint as ckpt_lib
from facejax.train import loop
from facejax.train.imprint import class_means, imprint_head
from facejax.train.state import resolve_input

pytestmark = pytest.mark.slow  # every test here takes seconds: not in ./run.sh test --fast


def test_class_means_are_normalised_means_in_any_row_order():
    model = create_model("raw_pixels", num_classes=3, rngs=nnx.Rngs(0), head="cosine")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (10, 8, 8, 3)).astype(np.uint8)
    rows = np.array([7, 2, 9, 0, 5, 3])
    labels = np.array([0, 1, 2, 0, 1, 2])
    means = class_means(model, images, rows, labels, 3, input_size=8, normalization="unit",
                        batch_size=4)  # batches of 4 and a padded 2
    emb = np.array(model.embed(images.astype(np.float32) / 255.0))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for c in range(3):
        want = emb[rows[labels == c]].mean(0)
        np.testing.assert_allclose(means[c], want / np.linalg.norm(want), atol=1e-5)
    imprint_head(model, means)
    logits = np.asarray(model(images[rows].astype(np.float32) / 255.0))
    # The head now scores each image by its cosine with each class's mean (a random head's
    # cosines are unrelated), and each image is nearest its own class's mean, which it is half of.
    want_means = np.stack([emb[rows[labels == c]].mean(0) for c in range(3)])
    want_means /= np.linalg.norm(want_means, axis=1, keepdims=True)
    np.testing.assert_allclose(logits, emb[rows] @ want_means.T, atol=1e-5)
    np.testing.assert_array_equal(logits.argmax(1), labels)
    with pytest.raises(ConfigError, match="class means"):
        imprint_head(model, means[:2])
    linear = create_model("raw_pixels", num_classes=3, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="model.head='cosine'"):
        imprint_head(linear, means)
    with pytest.raises(DataError, match="1 classes have no training image"):
        class_means(model, images, rows[:2], labels[:2], 3, input_size=8,
                    normalization="unit")


def test_training_with_an_imprinted_head_starts_accurate(tmp_path):
    idx_dir = tiny_idx(tmp_path / "idx")
    cfg = load_config(TINY, overrides(idx_dir) + [
        "train.epochs=0", "model.head=cosine", "train.loss=arcface", "train.head_init=imprint",
        "train.monitor=val_accuracy"])
    summary = loop.train_and_evaluate(cfg, str(tmp_path / "run"))
    # Class-mean classification of the (band-coded) classes is right before any step.
    assert summary["final"]["val_accuracy"] >= 0.9
    bad = load_config(TINY, ["train.head_init=imprint"])
    with pytest.raises(ConfigError, match="model.head='cosine'"):
        loop.validate_config(bad)
    with pytest.raises(ConfigError, match="head_init"):
        loop.validate_config(load_config(TINY, ["train.head_init=means"]))
    # The run saved the imprinted model as its best (and only) checkpoint: its head's class
    # weights are the normalised mean embeddings of each class's training images.
    run = str(tmp_path / "run")
    assert summary["best_checkpoint"] == os.path.join(run, "checkpoints", "0")
    saved, _ = ckpt_lib.restore_model(run)
    data = prepare_data(cfg.data)
    rows, labels = data.train.indices, data.train.labels
    size, norm = resolve_input(cfg)
    emb = np.array(saved.embed(preprocess_eval(np.asarray(data.images)[rows], size, norm)))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    want = np.stack([emb[labels == c].mean(0) for c in range(CLASSES)])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(saved.head.kernel[...]).T, want, atol=1e-4)
