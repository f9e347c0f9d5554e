"""The paper's scratch CNN (its Table 1) on a folder of faces, with the paper's recipe.

Adam 1e-3, softmax cross-entropy, batch 128, 10 epochs, per-epoch LR decay, early stopping
after 3 epochs without improvement, 128 px inputs rescaled to [0, 1]:

    python scripts/train.py --config configs/scratch_cnn.py --workdir runs/scratch_cnn \
        --config.data.root=/path/to/faces

The trained layers are Table 1's: the classifier reads the 25,088-wide Flatten (at 128 px). The
index stores the last block's 128 channels averaged over each quarter of its 14x14 positions
(`model.embedding_pool=avg2x2`, 512-d); `--config.model.embedding_pool=flatten` stores the
Flatten itself (49x the bytes per image), `avg` one average per channel (128-d).
"""

from facejax.config_schema import base


def get_config():
    c = base()
    c.model.name = "scratch_cnn"
    c.model.input_size = 128  # the Flatten's size depends on it; keep it equal to the cache
    c.model.dropout = 0.5     # Table 1's Dropout before the classifier
    return c
