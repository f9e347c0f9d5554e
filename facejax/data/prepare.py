"""`prepare_data(cfg.data)`: scan the source, cap it, decode it once into the cache, split it."""

from __future__ import annotations

import collections
import dataclasses
import numbers

import numpy as np

from facejax import limits
from facejax.data import cache, counts, decode, sources, splits
from facejax.data.sources import Listing
from facejax.data.splits import Subset
from facejax.errors import ConfigError, DataError

__all__ = ["PreparedData", "Subset", "data_change", "prepare_data"]

SOURCES = ("folder", "competition", "idx", "tfds")
PROTOCOLS = ("closed_set", "open_set")
# Which split of a record source becomes the training set (its own train/val split follows).
IDX_SPLIT = "train"
TFDS_SPLIT = "train"


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Cached images plus the protocol's subsets (see docs/CONTRACTS.md).

    `images` [N, S, S, 3] uint8 (memory-mapped) and `paths` (relative to `root`) share row
    order; subsets hold rows into them. train/val labels index `class_names`; query/gallery
    labels index `identity_names` (-1 = unlabelled) and `gallery is None` means leave-one-out.
    `protocol` is closed_set, open_set or competition. `val` only selects the model; the
    queries never overlap it, except closed_set with data.test_fraction=0 (query is val).
    `data_id` identifies the decoded data (counts, a hash of the file names and labels, a hash
    of the pixels, and the root): runs and indexes record it, and `data_change` compares two.
    """
    images: np.ndarray
    paths: list[str]
    root: str
    class_names: list[str]
    num_classes: int
    train: Subset
    val: Subset
    query: Subset
    gallery: Subset | None
    protocol: str
    skipped: list[tuple[str, str]]
    identity_names: list[str]
    cache_dir: str = ""
    data_id: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        g = "leave-one-out" if self.gallery is None else f"{len(self.gallery)} images"
        lines = [
            (f"images:   {len(self.images)} x {self.images.shape[1]}x{self.images.shape[2]} "
             f"from {self.root}"),
            f"classes:  {self.num_classes} training classes",
            (f"protocol: {self.protocol}: train {len(self.train)}, val {len(self.val)}, "
             f"query {len(self.query)}, gallery {g}"),
            f"cache:    {self.cache_dir}",
        ]
        lines += [("per class " + line[len("per identity "):] if line.startswith("per identity")
                   else "       " + line) for line in counts.summary_lines(self.class_counts())]
        if self.skipped:
            lines.append(f"skipped:  {len(self.skipped)} ({cache.summarize_skipped(self.skipped)})")
        return "\n".join(lines)


    def class_counts(self) -> dict:
        """Queries and gallery images per identity (`counts.counts_summary`)."""
        loo = self.gallery is None
        rows = counts.identity_counts(self.query.labels,
                                      None if loo else self.gallery.labels,
                                      self.identity_names)
        return counts.counts_summary(rows, gallery="gallery (leave-one-out)" if loo
                                     else "gallery")


def _test_fraction(cfg) -> float:
    # A run's config.json from before data.test_fraction existed trained on that split with
    # no test side: 0 reproduces its train set, so evaluation never queries training images.
    return cfg.get("test_fraction", 0.0)


def _exact_below(cfg) -> int:
    # A run's config.json from before data.exact_counts_below existed split every class by
    # hash thresholds: 0 reproduces that split, so evaluation never queries training images.
    return splits.check_exact_below(cfg.get("exact_counts_below", 0))


def _face_crop(cfg) -> tuple[float, ...]:
    # A run's config.json from before data.face_crop existed decoded whole images.
    return decode.check_face_crop(cfg.get("face_crop", ()))


def _check_config(cfg) -> None:
    """Bad settings fail here, before any scanning or decoding."""
    _face_crop(cfg)
    _exact_below(cfg)
    for key in ("image_size", "max_pixels", "decode_workers", "workers"):
        if key in cfg:
            limits.check_size(f"data.{key}", cfg[key])
    if isinstance(cfg.max_pixels, bool) or not isinstance(cfg.max_pixels, numbers.Integral) \
            or cfg.max_pixels < 1:
        raise ConfigError(f"data.max_pixels must be a whole number >= 1, got {cfg.max_pixels!r}")
    # The largest image that is decoded rather than skipped, as RGBA.
    limits.check_memory(cfg.max_pixels * 4,
                        f"decoding one image of data.max_pixels={cfg.max_pixels:,} pixels",
                        "lower data.max_pixels (larger images are skipped)")
    if cfg.source not in SOURCES:
        raise ConfigError(f"data.source must be one of {SOURCES}, got {cfg.source!r}")
    if cfg.source != "competition" and cfg.protocol not in PROTOCOLS:
        raise ConfigError(f"data.protocol must be one of {PROTOCOLS}, got {cfg.protocol!r}")
    splits.check_fractions(cfg.val_fraction, _test_fraction(cfg), cfg.open_set_holdout)
    splits.check_caps(max_classes=cfg.max_classes, max_per_class=cfg.max_per_class,
                      max_images=cfg.max_images)
    if cfg.min_images_per_class < 1:
        raise ConfigError(f"data.min_images_per_class must be >= 1, got {cfg.min_images_per_class}")


def _limited(listing: Listing, cfg) -> Listing:
    rows = splits.limit_rows(listing.paths, listing.labels, listing.class_names,
                             max_classes=cfg.max_classes, max_per_class=cfg.max_per_class,
                             max_images=cfg.max_images, min_images=cfg.min_images_per_class,
                             seed=cfg.split_seed)
    return listing if len(rows) == len(listing) else listing.subset(rows)


def _cache(listing: Listing, cfg, prune_cache: bool = False) -> cache.CachedImages:
    return cache.cache_listing(listing, image_size=cfg.image_size, resize_mode=cfg.resize_mode,
                               max_pixels=cfg.max_pixels, cache_dir=cfg.cache_dir,
                               workers=cfg.decode_workers, face_crop=_face_crop(cfg),
                               prune=prune_cache,
                               # A run's config.json from before the setting: free disk only.
                               max_cache_gb=cfg.get("max_cache_gb", 0.0))


def _data_id(cached: cache.CachedImages, root: str) -> dict:
    return dict(cached.content or {}, root=root)


def data_change(recorded: dict | None, current: dict | None) -> str:
    """What differs between two `PreparedData.data_id`s, in words ('' when the images, their
    names and labels are the same; a moved root or new file times do not count).

    Either side empty (a run or index from before data ids were recorded) compares as ''.
    """
    if not recorded or not current:
        return ""
    if all(recorded.get(k) == current.get(k) for k in ("files", "pixels")):
        return ""

    def counts(d):
        return f"{d.get('images')} images in {d.get('classes')} classes"

    if counts(recorded) != counts(current):
        what = f"{counts(recorded)} then, {counts(current)} now"
    elif recorded.get("files") != current.get("files"):
        what = (f"the same number of images ({current.get('images')}), but other file names "
                f"or labels")
    else:
        what = (f"the same {current.get('images')} file names and labels, but other pixels "
                f"(images replaced or edited)")
    if recorded.get("root") != current.get("root"):
        what += f"; the root was {recorded.get('root')}, now {current.get('root')}"
    return what


def _note_run_folders(listing: Listing) -> None:
    runs = [p for p, reason in listing.skipped if reason == sources.RUN_FOLDER_REASON]
    if runs:
        print(f"note: left out {len(runs)} facejax run folder{'s' if len(runs) > 1 else ''} "
              f"inside the data ({', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''}): "
              f"a --workdir holds the run's outputs, not images", flush=True)


def _report_excluded(excluded: list[tuple[str, str]]) -> None:
    if excluded:
        counts = collections.Counter(reason for _, reason in excluded)
        print("classes: " + ", ".join(f"{n} {r}" for r, n in counts.most_common()), flush=True)


def _scan(cfg) -> Listing:
    if cfg.source == "folder":
        return sources.scan_folder(cfg.root)
    if cfg.source == "idx":
        # No root: the built-in Fashion-MNIST (installed through apt when possible).
        directory = cfg.root or sources.ensure_fashion_mnist()
        return sources.scan_idx(directory, IDX_SPLIT)
    if not cfg.tfds_name:
        raise ConfigError("data.source=tfds needs data.tfds_name "
                          "(e.g. --config.data.tfds_name=mnist)")
    return sources.scan_tfds(cfg.tfds_name, cfg.get("tfds_split", TFDS_SPLIT), cfg.tfds_data_dir)


def _prepare_competition(cfg, prune_cache: bool) -> PreparedData:
    comp = sources.scan_competition(cfg.root)
    parts = [_limited(comp.training, cfg), comp.query, comp.gallery]
    union = Listing(cfg.root, [p for part in parts for p in part.paths],
                    np.concatenate([part.labels for part in parts]), comp.identity_names,
                    [s for part in parts for s in part.skipped])
    part_of = np.repeat(np.arange(3), [len(p) for p in parts])
    _note_run_folders(union)
    cached = _cache(union, cfg, prune_cache)
    paths = [union.paths[r] for r in cached.rows]
    labels = union.labels[cached.rows]
    kept_part = part_of[cached.rows]
    # training/ is split train/val only, to select the model; retrieval queries query/ against
    # gallery/, so a test side would only take images away from training.
    split = splits.closed_set(paths, labels, comp.identity_names,
                              rows=np.flatnonzero(kept_part == 0), val_fraction=cfg.val_fraction,
                              test_fraction=0.0, seed=cfg.split_seed,
                              min_images=cfg.min_images_per_class,
                              exact_below=_exact_below(cfg))
    _report_excluded(split.excluded)
    query, gallery = (np.flatnonzero(kept_part == k) for k in (1, 2))
    for name, rows in (("query", query), ("gallery", gallery)):
        if len(rows) == 0:
            raise DataError(f"no image in the competition {name}/ folder could be decoded")
    return PreparedData(
        images=cached.images, paths=paths, root=comp.training.root,
        class_names=split.class_names, num_classes=len(split.class_names),
        train=split.train, val=split.val, query=Subset(query, labels[query]),
        gallery=Subset(gallery, labels[gallery]), protocol="competition",
        skipped=cached.skipped + split.excluded, identity_names=comp.identity_names,
        cache_dir=cached.directory, data_id=_data_id(cached, comp.training.root))


def prepare_data(cfg, *, prune_cache: bool = False) -> PreparedData:
    """Builds (or reuses) the decoded cache for `cfg` (the config's `data` block) and splits it.

    Sources: folder (class sub-folders), competition (training/ + query/ + gallery/), idx
    (Fashion-MNIST idx files; its 'train' split), tfds (a prepared array_record dataset; its
    'train' split). max_classes / max_per_class / max_images pick seeded, stable subsets
    before decoding (of training/ only, for competition). Protocols: closed_set (per class:
    train / val / test; test queries train) or open_set (held-out identities, leave-one-out);
    competition always queries query/ against gallery/. In every protocol val (model selection)
    is disjoint from the queries, except closed_set with test_fraction=0 (the paper's setup).
    `prune_cache` deletes older cache entries of the same source and settings.

    Raises:
      ConfigError: unknown source/protocol, missing settings, negative caps or fractions
        outside [0, 1).
      DataError: missing or unusable data (nothing decodes, fewer than 2 training classes, ...).
    """
    _check_config(cfg)
    if cfg.source == "competition":
        return _prepare_competition(cfg, prune_cache)
    listing = _limited(_scan(cfg), cfg)
    _note_run_folders(listing)
    cached = _cache(listing, cfg, prune_cache)
    paths = [listing.paths[r] for r in cached.rows]
    labels = listing.labels[cached.rows]
    if cfg.protocol == "closed_set":
        split = splits.closed_set(paths, labels, listing.class_names,
                                  val_fraction=cfg.val_fraction, test_fraction=_test_fraction(cfg),
                                  seed=cfg.split_seed, min_images=cfg.min_images_per_class,
                                  exact_below=_exact_below(cfg))
        if not _test_fraction(cfg):
            print("note: data.test_fraction=0: closed-set queries are the validation images "
                  "that selected the checkpoint, so retrieval scores are optimistic", flush=True)
    else:
        split = splits.open_set(paths, labels, listing.class_names,
                                holdout=cfg.open_set_holdout,
                                min_eval_images=cfg.open_set_min_images,
                                val_fraction=cfg.val_fraction, seed=cfg.split_seed,
                                min_images=cfg.min_images_per_class,
                                exact_below=_exact_below(cfg))
        splits.check_disjoint(split)
    _report_excluded(split.excluded)
    return PreparedData(
        images=cached.images, paths=paths, root=listing.root, class_names=split.class_names,
        num_classes=len(split.class_names), train=split.train, val=split.val,
        query=split.query, gallery=split.gallery, protocol=split.protocol,
        skipped=cached.skipped + split.excluded, identity_names=split.identity_names,
        cache_dir=cached.directory, data_id=_data_id(cached, listing.root))
