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
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from facejax.config import has_key
from facejax.errors import CheckpointError
from facejax.train import orbax_noise

orbax_noise.quiet_expected_notes()

CHECKPOINT_DIR = "checkpoints"
MONITORS = {"val_accuracy": "max", "val_top1": "max", "val_loss": "min"}

# Config fields that may change between a run and its resume: they do not change what the
# checkpoint means (where data lives, how long to run, logging, evaluation-only settings).
RESUMABLE_FIELDS = (
    "data.root", "data.cache_dir", "data.tfds_data_dir", "data.decode_workers", "data.workers",
    "data.allow_changed_data", "data.max_cache_gb", "train.epochs",
    "train.early_stopping_patience", "train.log_every_steps", "train.checkpoint_every_steps",
    "index", "eval",
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
        options = ocp.CheckpointManagerOptions(
            best_fn=_score(monitor), best_mode="max",
            preservation_policy=ocm.AnyPreservationPolicy([
                ocm.LatestN(n=1),
                ocm.BestN(get_metric_fn=_score(monitor), n=1,
                          keep_checkpoints_without_metrics=False),
            ]),
            create=not read_only, read_only=read_only,
            save_interval_steps=0 if read_only else 1,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=True,
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
        self._mgr.save(int(step), args=args, metrics=metrics, force=True)

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
        """(state, meta, iterator state) at `step`, arrays placed as `abstract_state` says."""
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
        state = abstract_state.replace(step=train["step"], params=model["params"],
                                       batch_stats=model["batch_stats"],
                                       opt_state=train["opt_state"])
        return state, items["meta"], items["data"]["iterator"]

    def restore_model_arrays(self, step: int, abstract_model: dict) -> dict:
        """{params, batch_stats} at `step` (the optimizer state is not read)."""
        self.check_model_shapes(step, abstract_model)
        return self._restore(step, model=ocp.args.StandardRestore(abstract_model))["model"]

    def _restore(self, step: int, **items) -> dict:
        try:
            with orbax_noise.quiet_failed_restore():
                return self._mgr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise bare Exception (and
            # ValueError, KeyError, ...) for damaged files: the checkpoint is the user's file.
            step_dir = os.path.join(self.directory, str(step))
            raise CheckpointError(
                f"cannot restore checkpoint {step_dir}: it is damaged or does not match this "
                f"model ({_reason(e)}). Delete that folder to fall back to the run's other "
                f"checkpoint (if any), or train again in a new --workdir") from e

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and orbax's background threads; call on every exit path
        (a thread still running at interpreter exit prints a traceback)."""
        # orbax's close() does not wait for the start-up cleanup of half-written steps.
        await_cleanup = getattr(self._mgr, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self._mgr.close()


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
    diffs = config_differences(meta.get("config", {}), config_dict)
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

    config.json is read by `retrieval.workdir.read_run_config` (one reader for both sides);
    restoring a model also needs the training classes, for the classifier's size.
    """
    from facejax.retrieval.workdir import read_run_config

    config = read_run_config(workdir)
    missing = [key for key in RESTORE_KEYS if not has_key(config, key)]
    if missing:
        raise CheckpointError(f"{os.path.join(workdir, 'config.json')} lacks "
                              f"{', '.join(missing)}: it was not written by this version of "
                              "facejax")
    path = os.path.join(workdir, "classes.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: is {workdir} a training workdir?")
    try:
        with open(path) as f:
            classes = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
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
        arrays = ckpt.restore_model_arrays(
            step, {"params": abstract_like(params), "batch_stats": abstract_like(stats)})
    finally:
        ckpt.close()
    nnx.update(model, nnx.State(arrays["params"]), nnx.State(arrays["batch_stats"]))
    return model, config
