"""The config schema: every setting, its default and what it means. Experiment configs start from
`base()` (or `keras_transfer()`) and override only what differs; `configs/common.py` re-exports
this module for configs written against it."""

import ml_collections


def data() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        source="folder",         # folder | competition | idx | tfds
        root="",                 # image folder / competition root / idx dir
        tfds_name="",            # for source=tfds
        tfds_data_dir="",
        tfds_split="train",      # for source=tfds
        image_size=128,          # side (pixels) of the square uint8 cache
        resize_mode="crop",      # crop | pad: aspect-preserving resize, then center crop or pad
        face_crop=(),            # () = whole image; else (top, left, bottom, right) box in
                                 # fractions of the square image, applied before image_size
                                 # (may reach outside [0, 1]: padded with black). Adapts one
                                 # face alignment to another (ArcFace 112 -> dlib 150 chips).
        max_pixels=50_000_000,   # larger images are skipped (decompression bombs)
        cache_dir="",            # '' -> $FACEJAX_CACHE or ~/.cache/facejax
        max_cache_gb=1000.0,     # refuse to build a cache entry larger than this (N x S x S x 3
                                 # bytes); the free disk is checked too. 0 = free disk only
        decode_workers=0,        # 0 -> one per core
        protocol="closed_set",   # closed_set | open_set
        val_fraction=0.2,        # per-class fraction held out to select the model (early stop)
        test_fraction=0.2,       # closed_set: per-class fraction held out as the queries (gallery =
                                 # train); 0 = the paper's setup, queries = val (optimistic scores)
        split_seed=0,
        exact_counts_below=200,  # classes with fewer images get exact per-class counts (round(
                                 # fraction * n)); larger ones hash thresholds. 0 = thresholds
                                 # for all (runs saved before this setting)
        min_images_per_class=2,  # classes with fewer are excluded from splits (and reported)
        open_set_holdout=0.2,    # open_set: identities never trained on: a fraction in (0, 1),
                                 # or a whole count >= 2 (e.g. 10.0); fewer than 10 held out
                                 # are flagged (near-chance scores)
        open_set_min_images=5,   # open_set: held-out identities need this many for leave-one-out
        max_per_class=0,         # 0 = all; caps images per class (quick experiments)
        max_classes=0,           # 0 = all
        max_images=0,            # 0 = all; a seeded subset (demo on a laptop)
        workers=0,               # grain worker processes for the train iterator (0 = in-process)
        allow_changed_data=False,  # resume training / evaluate an index although the data's
                                   # files or pixels differ from what the checkpoint / index
                                   # recorded (refused otherwise); applies to this command only
    ))


def augment() -> ml_collections.ConfigDict:
    # The paper's ImageDataGenerator set, as one affine warp per image, on device.
    return ml_collections.ConfigDict(dict(
        rotation_deg=10.0,
        shear_deg=0.0,
        zoom=0.1,                # scale in [1 - zoom, 1 + zoom]
        translate=0.05,          # fraction of the side
        hflip=True,
        fill_mode="reflect",     # constant | nearest | reflect
        fill_value=0.0,          # constant fill, in [0, 1] units
        random_resized_crop=False,
        rrc_scale=(0.5, 1.0),
        brightness=0.0,
        contrast=0.0,
    ))


def model() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="scratch_cnn",
        pretrained="",           # '' (random init) | 'imagenet' | path to a weights file/checkpoint
        weights_source="",       # preset key: torchvision | keras | lukemelas ('' = model default)
        input_size=0,            # 0 -> preset's input size; images are resized to it on device
        embed_dim=0,             # 0 -> no projection: embedding = pooled features
        embedding_pool="avg2x2",  # scratch_cnn without embed_dim, what the index stores: avg2x2 =
                                 # the last block's channels averaged over each quarter of it
                                 # (512-d) | avg = over all of it (128-d) | flatten = the
                                 # Flatten the classifier reads (Table 1; 25,088-d at 128 px).
                                 # Other models always pool: leave it at avg2x2 or avg.
        l2_normalize=True,
        head="linear",           # linear (softmax) | cosine (ArcFace/CosFace)
        dropout=0.0,
        bn_momentum=0.0,         # 0 = the architecture's default (scratch_cnn: 0.9; Keras: 0.99)
    ))


def train() -> ml_collections.ConfigDict:
    # Defaults follow the paper's recipe: Adam, cross-entropy, batch 128, 10 epochs,
    # early stopping with patience 3, per-epoch LR decay.
    return ml_collections.ConfigDict(dict(
        batch_size=128,          # global
        epochs=10,
        optimizer="adam",        # adam | adamw | sgd
        learning_rate=1e-3,
        weight_decay=0.0,
        momentum=0.9,
        schedule="step",         # constant | step | exponential | cosine | one_cycle
        decay_rate=0.9,          # step/exponential: factor per epoch
        warmup_epochs=0.0,
        loss="softmax",          # softmax | arcface | cosface
        label_smoothing=0.0,
        logit_scale=30.0,        # arcface/cosface: the cosine logits are multiplied by this
                                 # (train.margin_scale before; old config.json files are read)
        margin=0.3,
        finetune="all",          # all | frozen_backbone | last_n
        trainable_last_n=4,
        backbone_lr_mult=1.0,    # discriminative LR: backbone LR = lr * this
        freeze_bn=False,
        head_init="random",      # random | imprint: cosine head = class-mean embeddings (for
                                 # fine-tuning a pretrained embedder without wrecking it)
        early_stopping_patience=3,
        monitor="val_top1",      # val_accuracy | val_top1 | val_map_r | val_loss
        compute_dtype="auto",    # auto (bf16 on GPU/TPU, f32 on CPU) | float32 | bfloat16
        remat="none",            # none | dots: the backward keeps only conv/matmul outputs and
                                 # recomputes BatchNorm/ReLU/pooling (less memory, more compute)
        log_every_steps=20,
        checkpoint_every_steps=0,  # 0 -> end of each epoch only
        max_steps_per_epoch=0,   # 0 = full epoch
        eval_gallery_max=5000,   # per-epoch retrieval eval: gallery size cap (0 = all)
    ))


def index() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        backend="auto",          # auto | exact | scann | milvus
        exact_max_items=200_000,  # auto: exact search up to this gallery size
        target_recall=0.95,      # ScaNN indexes tune leaves_to_search/reorder to reach this
                                 # recall@k vs exact search (0, in older runs: read as 0.95)
        scann_init="random",     # ScaNN leaf seeding: random (faster build) | kmeans++ (repeatable)
        scann_dims_per_block=0,  # ScaNN AH dims per block: 0 builds and tunes 1 and 2 and keeps
                                 # the faster at the target (twice the build time; not with
                                 # scann_init=kmeans++, which keeps 1) | 1 | 2
        milvus_uri="",           # backend milvus: PATH.db (Milvus Lite, embedded; "" -> WORKDIR/
                                 # milvus.db) or http://host:19530 (a Milvus server or cluster)
        milvus_collection="",    # "" -> facejax_<hash of the run folder's path>
        milvus_index="auto",     # auto (Lite: FLAT; server: by gallery size) | FLAT | HNSW |
                                 # IVF_FLAT | IVF_PQ | SCANN (milvus_index.py)
        embed_batch_size=256,    # images per embedder call when the gallery and queries are
                                 # embedded (index.batch_size before; old config.json is read)
    ))


def evaluate() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        ks=(1, 5, 10),
        num_figure_queries=6,
        exact_max_pairs=10_000_000_000,  # with a ScaNN index, score with exact search while
                                 # queries x gallery <= this (~30 s on 2 CPU cores at 128-d);
                                 # above it, ScaNN re-tuned for the depth mAP@R reads
        rejection_holdout=0.2,   # open-set rejection figures: this fraction of the identities is
                                 # held out of the gallery as unknown people (0 = none)
        explain_figure="",       # '' (off), 'auto', 'similarity' or 'occlusion': the report
                                 # also draws Figure 9 with explanation maps (needs the run's
                                 # checkpoint for similarity maps; occlusion is slower)
    ))


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data()
    c.augment = augment()
    c.model = model()
    c.train = train()
    c.index = index()
    c.eval = evaluate()
    return c


def keras_transfer(model_name: str) -> ml_collections.ConfigDict:
    """The paper's Keras transfer-learning recipe: ImageNet weights without the top, the backbone
    frozen except its last 4 parameterised layers, a new softmax head; the rest as `base()`."""
    c = base()
    c.model.name = model_name
    c.model.pretrained = "imagenet"
    c.model.weights_source = "keras_notop"  # include_top=False, as transfer learning does
    c.train.finetune = "last_n"
    c.train.trainable_last_n = 4
    return c
