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
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from facejax.errors import CheckpointError

log = logging.getLogger(__name__)


class _QuietExpected(logging.Filter):
    """Drops orbax notes about things this module does on purpose (mid-epoch checkpoints carry
    no metric; export opens the folder read-only)."""

    EXPECTED = ("did not provide metrics", "Given directory is read only",
                "setting save_interval_steps=0")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(e in record.getMessage() for e in self.EXPECTED)


logging.getLogger("absl").addFilter(_QuietExpected())

CHECKPOINT_DIR = "checkpoints"
MONITORS = {"val_accuracy": "max", "val_top1": "max", "val_loss": "min"}

# Config fields that may change between a run and its resume: they do not change what the
# checkpoint means (where data lives, how long to run, logging, evaluation-only settings).
RESUMABLE_FIELDS = (
    "data.root", "data.cache_dir", "data.decode_workers", "data.workers",
    "train.epochs", "train.early_stopping_patience", "train.log_every_steps",
    "train.checkpoint_every_steps", "index", "eval",
)


def _score(monitor: str):
    """Orbax best_fn, higher is better: (+-metric, -step), so a tie keeps the earliest epoch,
    as early stopping does."""
    sign = 1.0 if MONITORS[monitor] == "max" else -1.0
    return lambda m: (sign * float(m[monitor]), -int(m["step"]))


class RunCheckpoints:
    """The `workdir/checkpoints` orbax manager, keeping the latest and the best step."""

    def __init__(self, workdir: str, monitor: str = "val_top1", *, read_only: bool = False):
        if monitor not in MONITORS:
            raise CheckpointError(f"train.monitor must be one of {tuple(MONITORS)}, got {monitor!r}")
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
        # Handlers named up front, so a reopened folder can describe its items (shape checks).
        handlers = dict(model=ocp.StandardCheckpointHandler(),
                        train=ocp.StandardCheckpointHandler(),
                        meta=ocp.JsonCheckpointHandler(), data=ocp.JsonCheckpointHandler())
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        return self._mgr.best_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state, *, meta: dict, data_state: Any,
             metrics: dict | None = None) -> None:
        """Saves asynchronously; `metrics` (with the monitor) marks an epoch-end checkpoint."""
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
            saved = self._mgr.item_metadata(step)["model"]
        except (KeyError, TypeError, ValueError, FileNotFoundError):
            return  # no readable metadata: the restore itself reports a mismatch
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
            return self._mgr.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match this model "
                f"(or is unreadable): {type(e).__name__}: {str(e)[:500]}") from e

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()


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


def abstract_like(tree, sharding=None):
    """ShapeDtypeStructs for a pytree of arrays (placed with `sharding` when given)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
                        tree)


def load_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(config, class names) from a workdir's config.json and classes.json."""
    paths = [os.path.join(workdir, n) for n in ("config.json", "classes.json")]
    for p in paths:
        if not os.path.isfile(p):
            raise CheckpointError(f"{p} is missing: is {workdir} a training workdir?")
    try:
        with open(paths[0]) as f:
            config = ml_collections.ConfigDict(json.load(f))
        with open(paths[1]) as f:
            classes = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the run files in {workdir}: {e}") from e
    if not isinstance(classes, list) or not classes:
        raise CheckpointError(f"{paths[1]} must hold a non-empty list of class names")
    return config, classes


def restore_model(workdir: str, which: str = "best"):
    """(model, config) from a training workdir: `which` is 'best' or 'latest'.

    'best' falls back to the latest step when no epoch finished (no metric was recorded).
    """
    from facejax.train import state as state_lib  # models are only needed here

    if which not in ("best", "latest"):
        raise CheckpointError(f"which must be 'best' or 'latest', got {which!r}")
    config, classes = load_run_config(workdir)
    ckpt = RunCheckpoints(workdir, config.train.monitor, read_only=True)
    step = ckpt.best_step() if which == "best" else None
    step = step if step is not None else ckpt.latest_step()
    if step is None:
        raise CheckpointError(f"no finished checkpoint in {ckpt.directory}")
    meta = ckpt.read_meta(step)
    check_compatible(meta, config.to_dict(), len(classes), ckpt.directory)
    model = state_lib.build_model(config, len(classes))
    _, params, stats, _ = state_lib.split_model(model)
    arrays = ckpt.restore_model_arrays(
        step, {"params": abstract_like(params), "batch_stats": abstract_like(stats)})
    ckpt.close()
    from flax import nnx

    nnx.update(model, nnx.State(arrays["params"]), nnx.State(arrays["batch_stats"]))
    return model, config
