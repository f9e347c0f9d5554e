"""Orbax checkpoints of a run (best + latest), resume checks, and `restore_model` for export.

One checkpoint step holds four items:
- `model`: {params, batch_stats} (all that inference needs; `restore_model` reads only this);
- `train`: {step, opt_state};
- `meta` (JSON): epoch, position in the epoch, the seed's key data, early-stopping state, the
  model name, class count and the resolved config (checked on resume);
- `data` (JSON): the grain iterator state, so a resumed run sees the same batches.

Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a
checkpoint half-written when the process died is never listed as a step (and is deleted on the
next start). Retention: the latest step (resume) and the best by the monitored metric (export).

Every step also holds `SHA256SUMS`, the checksums of its items' files, written into the
temporary folder before the rename. Restoring (resume, export) checks them before reading an
array, then checks that the arrays are finite, and names the step's folder when either fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from facejax import rundir
from facejax.atomic import write_file_atomic
from facejax.errors import CheckpointError
from facejax.rundir import CHECKPOINT_DIR
from facejax.train import orbax_noise

MONITORS = {"val_accuracy": "max", "val_top1": "max", "val_map_r": "max", "val_loss": "min"}
# The depths of the per-epoch validation's retrieval Top-k (val_top1, val_top5: metrics.jsonl,
# the epoch line, the accuracy plot; val_top1 is a monitor). Fixed rather than eval.ks: eval.*
# may change when a run resumes (RESUMABLE_FIELDS), and a run's curves and its monitor must
# keep their names from its first epoch to its last. eval.ks sets the report's depths.
VAL_KS = (1, 5)

# Config fields that may change between a run and its resume: they do not change what the
# checkpoint means (where data lives, how long to run, logging, evaluation-only settings).
# The learning rate too: the optimizer state holds no learning rate (the schedule is a function
# of the step), and lowering it is how a run that diverged goes on (loop._divergence_advice).
RESUMABLE_FIELDS = (
    "data.root", "data.cache_dir", "data.tfds_data_dir", "data.decode_workers", "data.workers",
    "data.allow_changed_data", "data.max_cache_gb", "train.epochs",
    "train.early_stopping_patience", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.learning_rate", "index", "eval",
)


def _score(monitor: str):
    """Orbax best_fn, higher is better: (+-metric, -step), so a tie keeps the earliest epoch,
    as early stopping does."""
    sign = 1.0 if MONITORS[monitor] == "max" else -1.0
    return lambda m: (sign * float(m[monitor]), -int(m["step"]))


class RunCheckpoints:
    """The `workdir/checkpoints` orbax manager, keeping the latest and the best step.

    `data_id` (the training data's `PreparedData.data_id`, set by the loop) is recorded in
    every checkpoint's meta, so that a resume can tell when the data changed.
    """

    data_id: dict | None = None

    def __init__(self, workdir: str, monitor: str = "val_top1", *, read_only: bool = False):
        if monitor not in MONITORS:
            raise CheckpointError(f"train.monitor must be one of {tuple(MONITORS)}, "
                                  f"got {monitor!r}")
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        self.monitor = monitor
        self._saving: int | None = None  # the step whose async save is under way
        self._verified: set[int] = set()
        options = ocp.CheckpointManagerOptions(
            best_fn=_score(monitor), best_mode="max",
            preservation_policy=ocm.AnyPreservationPolicy([
                ocm.LatestN(n=1),
                ocm.BestN(get_metric_fn=_score(monitor), n=1,
                          keep_checkpoints_without_metrics=False),
            ]),
            create=not read_only, read_only=read_only,
            save_interval_steps=0 if read_only else 1,
            # Half-written steps are deleted by `_delete_unfinished_steps` below, before the
            # manager exists: orbax's cleanup runs in a thread that close() does not wait for.
            cleanup_tmp_directories=False,
            enable_async_checkpointing=True,
            # Runs on the primary host once every process has written the step, before the
            # step folder is renamed into place: the checksums become part of the step.
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums),
        )
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoints in {workdir} ({self.directory} is missing)")
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory} is a file, not a checkpoint folder")
        # Handlers named up front, so a reopened folder can describe its items (shape checks).
        handlers = dict(model=ocp.StandardCheckpointHandler(),
                        train=ocp.StandardCheckpointHandler(),
                        meta=ocp.JsonCheckpointHandler(), data=ocp.JsonCheckpointHandler())
        try:
            if not read_only:
                _delete_unfinished_steps(self.directory)
            with orbax_noise.quiet_expected_notes():
                self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                                  item_handlers=handlers)
        except OSError as e:
            raise CheckpointError(f"cannot open the checkpoint folder {self.directory}: "
                                  f"{e}") from e

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        return self._mgr.best_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state, *, meta: dict, data_state: Any,
             metrics: dict | None = None) -> None:
        """Saves asynchronously; `metrics` (with the monitor) marks an epoch-end checkpoint."""
        if self.data_id:
            meta = dict(meta, data=self.data_id)
        args = ocp.args.Composite(
            model=ocp.args.StandardSave({"params": state.params,
                                         "batch_stats": state.batch_stats}),
            train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            meta=ocp.args.JsonSave(meta),
            data=ocp.args.JsonSave({"iterator": data_state}),
        )
        if metrics is not None:
            metrics = {"step": int(step), self.monitor: float(metrics[self.monitor])}
        self._mgr.wait_until_finished()  # (orbax does too) so `_saving` names the step below
        self._saving = int(step)
        with orbax_noise.quiet_expected_notes():
            self._mgr.save(int(step), args=args, metrics=metrics, force=True)

    def _write_checksums(self) -> None:
        """orbax's post-finalization callback: CHECKSUMS_NAME into the step being saved.

        Never raises (it runs in orbax's save thread): without the file, restoring checks
        finiteness only."""
        step = self._saving
        try:
            folder = _unfinished_step_dir(self.directory, step) if step is not None else None
            if folder is not None:
                write_checksums(folder)
        except OSError as e:
            logging.getLogger(__name__).warning("no checksums for checkpoint step %s: %s",
                                                step, e)

    def check_model_shapes(self, step: int, abstract_model: dict) -> None:
        """Raises CheckpointError naming the parameters whose shapes differ from the model's
        (another architecture, class count or embedding size), before any array is read."""
        try:
            with orbax_noise.quiet_failed_restore():
                saved = self._mgr.item_metadata(step)["model"]
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore reports the damage
            return
        if saved is None:
            return
        saved = _shapes(getattr(saved, "tree", saved))
        want = _shapes(abstract_model)
        problems = [f"{k}: checkpoint {saved[k]}, model {want[k]}"
                    for k in sorted(saved.keys() & want.keys()) if saved[k] != want[k]]
        problems += [f"{k}: only in the checkpoint" for k in sorted(saved.keys() - want.keys())]
        problems += [f"{k}: only in the model" for k in sorted(want.keys() - saved.keys())]
        if problems:
            shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} in all)"
                                               if len(problems) > 6 else "")
            raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match "
                                  f"this model: {shown}")

    def read_meta(self, step: int) -> dict:
        return self._restore(step, meta=ocp.args.JsonRestore())["meta"]

    def restore(self, step: int, abstract_state) -> tuple[Any, dict, Any]:
        """(state, meta, iterator state) at `step`, arrays placed as `abstract_state` says.

        CheckpointError naming the step's folder when its files fail their checksums or its
        arrays hold NaN/inf."""
        self.check_model_shapes(step, {"params": abstract_state.params,
                                       "batch_stats": abstract_state.batch_stats})
        items = self._restore(
            step,
            model=ocp.args.StandardRestore({"params": abstract_state.params,
                                            "batch_stats": abstract_state.batch_stats}),
            train=ocp.args.StandardRestore({"step": abstract_state.step,
                                            "opt_state": abstract_state.opt_state}),
            meta=ocp.args.JsonRestore(),
            data=ocp.args.JsonRestore(),
        )
        model, train = items["model"], items["train"]
        self._check_finite(step, {"params": model["params"], "batch_stats": model["batch_stats"],
                                  "opt_state": train["opt_state"]})
        state = abstract_state.replace(step=train["step"], params=model["params"],
                                       batch_stats=model["batch_stats"],
                                       opt_state=train["opt_state"])
        return state, items["meta"], items["data"]["iterator"]

    def restore_model_arrays(self, step: int, abstract_model: dict) -> dict:
        """{params, batch_stats} at `step` (the optimizer state is not read)."""
        self.check_model_shapes(step, abstract_model)
        arrays = self._restore(step, model=ocp.args.StandardRestore(abstract_model))["model"]
        self._check_finite(step, arrays)
        return arrays

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _check_finite(self, step: int, tree) -> None:
        bad = nonfinite_leaves(tree)
        if bad:
            raise CheckpointError(
                f"cannot restore checkpoint {self.step_dir(step)}: it holds NaN or infinite "
                f"values ({_listed(bad)}), so it is damaged or was saved by a run that "
                f"diverged. {_DELETE_ADVICE}")

    def _verify(self, step: int) -> None:
        """Checks the step's files against its checksums (once per step and manager)."""
        if step in self._verified:
            return
        problem = verify_checksums(self.step_dir(step))
        if problem:
            raise CheckpointError(f"cannot restore checkpoint {self.step_dir(step)}: it is "
                                  f"damaged ({problem}). {_DELETE_ADVICE}")
        self._verified.add(step)

    def _restore(self, step: int, **items) -> dict:
        self._verify(step)
        try:
            with orbax_noise.quiet_failed_restore():
                return self._mgr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise bare Exception (and
            # ValueError, KeyError, ...) for damaged files: the checkpoint is the user's file.
            raise CheckpointError(
                f"cannot restore checkpoint {self.step_dir(step)}: it is damaged or does not "
                f"match this model ({_reason(e)}). {_DELETE_ADVICE}") from e

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and orbax's background threads; call on every exit path
        (a thread still running at interpreter exit prints a traceback)."""
        self._mgr.close()


_DELETE_ADVICE = ("Delete that folder to fall back to the run's other checkpoint (if any), or "
                  "train again in a new --workdir")

# ----------------------------------------------------------------------------- integrity
# orbax 0.12 checksums none of the array data it writes (zarr v2 chunks; zarr v3 would add a
# crc32c to shard indices only), so a flipped byte restores as a wrong number. Each step
# therefore carries the SHA-256 of every file of its items, in `sha256sum` format (check one
# by hand with `cd checkpoints/<step> && sha256sum -c SHA256SUMS`).
CHECKSUMS_NAME = "SHA256SUMS"
_TMP_MARK = ".orbax-checkpoint-tmp"  # orbax: '<step>.orbax-checkpoint-tmp-<n>' while writing


def _delete_unfinished_steps(directory: str) -> None:
    """Deletes the temporary folders of steps that were never finished (a run killed while
    saving), on the primary process, as orbax's `cleanup_tmp_directories` would, but before
    returning: orbax runs its cleanup in a background thread that `close()` does not wait
    for, and a thread still running at exit prints a traceback."""
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for tmp in ocp.utils.tmp_checkpoints(directory):
        shutil.rmtree(tmp.get(), ignore_errors=True)


def _unfinished_step_dir(directory: str, step: int) -> str | None:
    """The folder orbax is finalizing for `step`: its temporary folder (renamed into place
    after the callback), else the step folder itself (filesystems without renames)."""
    prefix = f"{step}{_TMP_MARK}"
    tmp = [os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(prefix)]
    if tmp:
        return max(tmp, key=os.path.getmtime)
    final = os.path.join(directory, str(step))
    return final if os.path.isdir(final) else None


def _item_files(folder: str) -> list[str]:
    """Paths (relative, '/'-separated, sorted) of the files in the step's item folders."""
    out = []
    for item in sorted(os.listdir(folder)):
        if not os.path.isdir(os.path.join(folder, item)):
            continue  # step-level files (orbax's metadata, ours) are not item data
        for root, dirs, files in os.walk(os.path.join(folder, item)):
            dirs.sort()
            out += [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
                    for f in sorted(files)]
    return out


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(folder: str) -> None:
    """Writes `folder/SHA256SUMS` for the files of the checkpoint step `folder`."""
    lines = "".join(f"{_sha256(os.path.join(folder, rel))}  {rel}\n"
                    for rel in _item_files(folder))
    write_file_atomic(os.path.join(folder, CHECKSUMS_NAME), lines.encode())


def verify_checksums(folder: str) -> str:
    """'' when the step's files match its SHA256SUMS (or it has none: written before facejax
    kept checksums), else what is wrong."""
    path = os.path.join(folder, CHECKSUMS_NAME)
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as e:
        return f"cannot read {CHECKSUMS_NAME}: {e}"
    for n, line in enumerate(text.splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel or rel.startswith("/") or ".." in rel.split("/"):
            return f"line {n} of {CHECKSUMS_NAME} is not '<sha256>  <file>'"
        try:
            actual = _sha256(os.path.join(folder, rel))
        except OSError as e:
            return f"{rel} cannot be read ({e.strerror or e})"
        if actual != digest:
            return f"{rel} does not match the checksum recorded when it was saved"
    return ""


def nonfinite_leaves(tree) -> list[str]:
    """Names ('params/head/kernel') of the floating-point arrays of `tree` holding NaN or inf.

    jax.Arrays are read shard by shard, each distinct shard once: a replicated array costs one
    host copy per process (every process of a multi-host job gets the same answer)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(path, simple=True, separator="/")
            for path, leaf in flat if not _all_finite(leaf)]


def _all_finite(x) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
        return True
    if not isinstance(x, jax.Array):
        return bool(np.isfinite(np.asarray(x)).all())
    seen = set()
    for shard in x.addressable_shards:
        key = repr(shard.index)
        if key not in seen:
            seen.add(key)
            if not np.isfinite(np.asarray(shard.data)).all():
                return False
    return True


def _listed(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit
                                       else "")


def _reason(e: BaseException, limit: int = 300) -> str:
    """The innermost cause's first line (tensorstore appends kilobytes of spec to the outer
    exception)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _shapes(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
            for path, leaf in flat}


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, except RESUMABLE_FIELDS."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if name in RESUMABLE_FIELDS:
            continue
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, name + ".")
        elif _normal(a) != _normal(b):
            diffs.append(f"{name}: checkpoint {a!r}, now {b!r}")
    return diffs


def _normal(v):
    return json.loads(json.dumps(v, default=list))


def check_compatible(meta: dict, config_dict: dict, num_classes: int, directory: str) -> None:
    """Raises CheckpointError when a checkpoint was written by another model/classes/config."""
    if meta.get("model") != config_dict["model"]["name"]:
        raise CheckpointError(
            f"the checkpoint in {directory} is for model {meta.get('model')!r}, the config asks "
            f"for {config_dict['model']['name']!r}: use another --workdir")
    if int(meta.get("num_classes", -1)) != int(num_classes):
        raise CheckpointError(
            f"the checkpoint in {directory} has {meta.get('num_classes')} classes, the data has "
            f"{num_classes}: use another --workdir")
    saved = meta.get("config", {})
    # A checkpoint's config is a run config too: one saved by an older facejax is compared on
    # today's schema (rundir.migrate), as its config.json is read.
    diffs = config_differences(rundir.migrate(saved).to_dict() if saved else saved, config_dict)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 8 else "")
        raise CheckpointError(
            f"the checkpoint in {directory} was written with another config ({shown}). Resume "
            f"with the original settings, or start a new --workdir")


def check_same_data(meta: dict, data_id: dict, directory: str, *, allow: bool = False) -> None:
    """Refuses to resume a checkpoint trained on other data than `data_id` describes.

    The checkpoint's meta records the data it was trained on (`PreparedData.data_id`): file
    names, labels and decoded pixels, not file times or where the data lives, so a moved or
    copied folder resumes. `allow` (data.allow_changed_data) accepts a change with a warning.
    Checkpoints saved before data ids were recorded resume with a note.
    """
    from facejax.data.prepare import data_change

    recorded = meta.get("data")
    if not data_id:
        return
    if not recorded:
        print(f"note: the checkpoint in {directory} records no data id (saved by an older "
              f"facejax): resuming without checking that the data is unchanged", flush=True)
        return
    change = data_change(recorded, data_id)
    if not change:
        return
    if allow:
        print(f"warning: the training data changed since the checkpoint in {directory} "
              f"({change}); resuming on the new data because data.allow_changed_data=true",
              flush=True)
        return
    raise CheckpointError(
        f"the checkpoint in {directory} was trained on other data: {change}. Resume with the "
        f"original data, start a new --workdir, or pass --config.data.allow_changed_data=true "
        f"to continue training on the new data")


def abstract_like(tree, sharding=None):
    """ShapeDtypeStructs for a pytree of arrays (placed with `sharding` when given)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
                        tree)


# The run settings that restoring and exporting a model read from config.json.
RESTORE_KEYS = ("seed", "train.monitor", "model.name", "model.weights_source",
                "model.input_size", "model.embed_dim", "model.l2_normalize", "model.head",
                "model.dropout", "data.image_size", "data.resize_mode")


def load_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(config, class names) from a workdir's config.json and classes.json.

    config.json is read by `rundir.read_run_config` (one reader for every step); restoring a
    model also needs the training classes, for the classifier's size.
    """
    config = rundir.read_run_config(workdir, rundir.RUN_KEYS + RESTORE_KEYS)
    path = os.path.join(workdir, rundir.CLASSES_JSON)
    classes = rundir.read_json(path, f"{path} is missing: is {workdir} a training workdir?")
    if not isinstance(classes, list) or not classes:
        raise CheckpointError(f"{path} must hold a non-empty list of class names")
    return config, classes


def restore_model(workdir: str, which: str = "best", dtype=None):
    """(model, config) from a training workdir: `which` is 'best' or 'latest'.

    'best' falls back to the latest step when no epoch finished (no metric was recorded).
    `dtype` is the compute dtype of the returned model (default float32); the parameters
    stay float32 either way.
    """
    from flax import nnx

    from facejax.train import state as state_lib  # models are only needed here

    if which not in ("best", "latest"):
        raise CheckpointError(f"which must be 'best' or 'latest', got {which!r}")
    config, classes = load_run_config(workdir)
    if config.train.monitor not in MONITORS:
        raise CheckpointError(f"{workdir}/config.json: train.monitor must be one of "
                              f"{tuple(MONITORS)}, got {config.train.monitor!r}")
    # Everything that can be refused from the config is refused before orbax opens the folder.
    model = state_lib.build_model(config, len(classes), dtype=dtype or jax.numpy.float32)
    _, params, stats, _ = state_lib.split_model(model)
    ckpt = RunCheckpoints(workdir, config.train.monitor, read_only=True)
    try:
        step = ckpt.best_step() if which == "best" else None
        step = step if step is not None else ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"no finished checkpoint in {ckpt.directory}")
        meta = ckpt.read_meta(step)
        check_compatible(meta, config.to_dict(), len(classes), ckpt.directory)
        # Onto this process's first device: a checkpoint saved by a multi-process job names
        # devices this process does not have (orbax then needs the target placement).
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        arrays = ckpt.restore_model_arrays(
            step, {"params": abstract_like(params, here),
                   "batch_stats": abstract_like(stats, here)})
    finally:
        ckpt.close()
    nnx.update(model, nnx.State(arrays["params"]), nnx.State(arrays["batch_stats"]))
    return model, config
