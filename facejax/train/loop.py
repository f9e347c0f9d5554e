"""`train_and_evaluate(config, workdir)`: epochs of the jitted step, evaluation, logs, checkpoints.

Each epoch ends with an evaluation on the validation split: loss, accuracy, and retrieval
Top-1/Top-5 — each validation image queries, by exact search over the model's embeddings, a
gallery of training images (a seeded sample of at most `train.eval_gallery_max` of them, so
the cost stays bounded on big datasets), and counts a hit when a top-k result has its class.
Then come the metrics line (`metrics.jsonl`), TensorBoard scalars (`events/`), refreshed plots
(`plots/`), early stopping and a checkpoint. Running the same command again resumes from the latest
checkpoint (params, optimizer, iterator position; the RNG is a function of the step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from facejax.atomic import write_file_atomic
from facejax.config import to_json
from facejax.convert.weights import load_from_config, pretrained_path
from facejax.data.pipeline import create_train_iterator, eval_batches, to_global
from facejax.data.prepare import PreparedData, prepare_data
from facejax.errors import ConfigError, DataError, TrainingError
from facejax.retrieval.index import ExactSearcher
from facejax.retrieval.metrics import (average_precision_at_r, count_relevant, hit_at_k,
                                       relevance)
from facejax.rundir import (CLASSES_JSON, CONFIG_JSON, EVENTS_DIR, METRICS_JSONL, PLOTS_DIR,
                            check_workdir, make_workdir, with_absolute_paths)
from facejax.runlock import hold_workdir_lock
from facejax.sharding import make_data_mesh, replicated
from facejax.train import checkpoint as ckpt_lib
from facejax.train import state as state_lib
from facejax.train.batch import fit_batch_to_data
from facejax.train.events import EventWriter
from facejax.train.imprint import class_means, imprint_head
from facejax.train.losses import LossConfig
from facejax.train.scratch import unfreeze_without_weights

from facejax.train.mesh import is_primary, replicate
from facejax.train.plots import plot_history
from facejax.train.step import jit_eval_step, jit_train_step

@dataclasses.dataclass
class Progress:
    """Loop position and early-stopping state; saved in every checkpoint's meta."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0
    best_value: float | None = None
    best_epoch: int = 0
    best_step: int = 0
    bad_epochs: int = 0
    loss_sum: float = 0.0  # this epoch's running sums (a mid-epoch checkpoint carries them)
    acc_sum: float = 0.0
    steps_summed: int = 0


def train_and_evaluate(config, workdir: str, data: PreparedData | None = None) -> dict:
    """Trains `config` in `workdir` (resuming when it holds a checkpoint); returns a summary.

    `data`: already prepared data (tests); by default `prepare_data(config.data)`.
    One process at a time trains in a workdir: a second one (or an export of it) stops with
    `runlock.Busy` naming the holder's pid. Each process of a multi-host job locks its own
    index, so the hosts of one job share the folder.
    """
    t_start = time.time()
    workdir = check_workdir(workdir)
    config = with_absolute_paths(config)
    unfreeze_without_weights(config, quiet=not is_primary())
    validate_config(config)
    created = make_workdir(workdir)
    ok = False
    try:
        with hold_workdir_lock(workdir, "train", process_index=jax.process_index()) as lock:
            try:
                summary = _prepare_and_train(config, workdir, data)
                ok = True
            finally:
                if not ok and created:  # a failed start leaves nothing behind
                    lock.discard()
    finally:
        if not ok and created:
            _remove_empty(workdir)
    summary["train_time_s"] = time.time() - t_start
    if is_primary():
        _print_summary(summary)
    return summary


def _prepare_and_train(config, workdir: str, data: PreparedData | None) -> dict:
    """The body of `train_and_evaluate`, run while holding the workdir's lock."""
    t = config.train
    data = data if data is not None else prepare_data(config.data)
    if len(data.train) == 0:
        raise DataError("the training split is empty")
    mesh = make_data_mesh()
    n_dev = mesh.devices.size
    fit_batch_to_data(config, len(data.train), n_dev, quiet=not is_primary())
    if t.batch_size % n_dev:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of the "
                          f"{n_dev} devices of the 'data' mesh")
    # The model, iterator and optimizer refuse what the config gets wrong before the
    # checkpoint folder is created (a failed start leaves nothing behind).
    model = state_lib.build_model(config, data.num_classes,
                                  dtype=state_lib.compute_dtype(t.compute_dtype))
    iterator = create_train_iterator(data.images, data.train, config)
    spe = iterator.steps_per_epoch
    if t.max_steps_per_epoch:
        spe = min(spe, int(t.max_steps_per_epoch))
    state, bundle, tx, schedule = state_lib.create_train_state(
        config, model, steps_per_epoch=spe, total_steps=spe * t.epochs)
    run = _Run(config=config, workdir=workdir, data=data, mesh=mesh, model=model,
               iterator=iterator, steps_per_epoch=spe, state=state, bundle=bundle, tx=tx,
               schedule=schedule, primary=is_primary())
    del model, state
    ckpt = ckpt_lib.RunCheckpoints(workdir, t.monitor)
    ok = False
    try:
        summary = _train(run, ckpt)
        ok = True
    except Diverged as e:
        ckpt.wait()  # a save under way finishes first: it is where the rerun resumes
        raise TrainingError(_divergence_advice(e, config, ckpt, spe)) from None
    finally:
        # Closing waits for orbax's threads: one left running at exit prints a traceback.
        ckpt.close()
        if not ok:
            _remove_empty(ckpt.directory)
    return summary


@dataclasses.dataclass
class _Run:
    """What `train_and_evaluate` built and checked before opening the checkpoint folder."""

    config: Any
    workdir: str
    data: PreparedData
    mesh: Any
    model: Any  # the nnx model `state` was split from (pretrained weights are loaded into it)
    iterator: Any
    steps_per_epoch: int
    state: state_lib.TrainState
    bundle: state_lib.ModelBundle
    tx: Any
    schedule: Any
    primary: bool


def _train(run: _Run, ckpt: ckpt_lib.RunCheckpoints):
    """Resumes or starts, then runs the epochs; returns the summary (without the total time)."""
    config, data, mesh = run.config, run.data, run.mesh
    config_dict = json.loads(to_json(config))
    state = run.state
    latest = ckpt.latest_step()
    ckpt.data_id = data.data_id  # recorded in every checkpoint, checked on resume
    if latest is not None:  # refuse another run's checkpoint before reading its arrays
        meta = ckpt.read_meta(latest)
        ckpt_lib.check_compatible(meta, config_dict, data.num_classes, ckpt.directory)
        ckpt_lib.check_same_data(meta, data.data_id, ckpt.directory,
                                 allow=bool(config.data.allow_changed_data))
        if meta.get("classes") != list(data.class_names):
            raise ckpt_lib.CheckpointError(
                f"the checkpoint in {ckpt.directory} was trained on other classes than the "
                f"data now has: use another --workdir")
    elif config.model.pretrained or config.train.head_init == "imprint":
        # (A resumed run restores its own weights instead.)
        if config.model.pretrained:
            load_from_config(run.model, config.model)
        if config.train.head_init == "imprint":
            size, norm = state_lib.resolve_input(config)
            print(f"imprinting the head with the class means of {len(data.train)} training "
                  f"images", flush=True)
            imprint_head(run.model, class_means(
                run.model, data.images, data.train.indices, data.train.labels,
                data.num_classes, input_size=size, normalization=norm))
        _, params, stats, _ = state_lib.split_model(run.model)
        state = state.replace(params=params, batch_stats=stats, opt_state=run.tx.init(params))
    run.model = run.state = None  # the arrays live in `state` from here on
    repl = replicated(mesh)
    state = replicate(state, mesh)
    run_key = replicate(jax.random.key_data(jax.random.key(config.seed)), mesh)

    progress = Progress()
    metrics_path = os.path.join(run.workdir, METRICS_JSONL)
    if latest is not None:
        state, meta, iterator_state = ckpt.restore(latest, ckpt_lib.abstract_like(state, repl))
        run.iterator.set_state(iterator_state)
        progress = Progress(**meta["progress"])
        history = _read_history(metrics_path, max_step=latest)
        print(f"resuming from step {latest} (epoch {progress.epoch}, "
              f"{progress.step_in_epoch} steps into the next)", flush=True)
    else:
        history = []
    if run.primary:
        _write_run_files(run.workdir, config, data.class_names, history, metrics_path)
    writer = EventWriter(os.path.join(run.workdir, EVENTS_DIR)) if run.primary else None
    try:
        return _epochs(run, ckpt, writer, state, run_key, progress, history, metrics_path,
                       config_dict)
    finally:
        if writer:
            writer.close()


@dataclasses.dataclass
class _Epochs:
    """What the epoch loop's parts share: the run, its jitted steps and its outputs."""

    run: _Run
    ckpt: Any
    writer: Any
    run_key: Any
    progress: Progress
    history: list
    metrics_path: str
    train_fn: Any
    eval_fn: Any
    gallery: tuple
    meta_base: dict
    clock: _Throughput


def _epochs(run: _Run, ckpt, writer, state, run_key, progress: Progress, history: list,
            metrics_path: str, config_dict: dict) -> dict:
    """The epoch loop, from `progress` on; returns the summary (without the total time)."""
    config, data = run.config, run.data
    t = config.train
    train_fn, eval_fn = _jit_steps(run)
    gallery = _gallery_sample(data, config.seed, config.train.eval_gallery_max)
    meta_base = dict(model=config.model.name, num_classes=int(data.num_classes),
                     classes=list(data.class_names), config=config_dict,
                     rng=np.asarray(jax.random.key_data(jax.random.key(config.seed))).tolist(),
                     steps_per_epoch=run.steps_per_epoch)
    loop = _Epochs(run=run, ckpt=ckpt, writer=writer, run_key=run_key, progress=progress,
                   history=history, metrics_path=metrics_path, train_fn=train_fn,
                   eval_fn=eval_fn, gallery=gallery, meta_base=meta_base,
                   clock=_Throughput(t.batch_size))
    step = int(jax.device_get(state.step))
    stopped_early = progress.bad_epochs >= t.early_stopping_patience > 0
    record: dict[str, Any] = history[-1] if history else {}
    if (t.epochs == 0 or config.model.pretrained) and not history:
        record = _epoch_zero(loop, state, step)
    while progress.epoch < t.epochs and not stopped_early:
        t_epoch = time.perf_counter()
        state, step = _train_epoch(loop, state, step)
        record = _end_epoch(loop, state, step, t_epoch)
        stopped_early = progress.bad_epochs >= t.early_stopping_patience > 0
        if stopped_early:
            print(f"early stopping: {t.monitor} has not improved for {progress.bad_epochs} "
                  f"epochs", flush=True)
    ckpt.wait()
    return _summary(loop, step, stopped_early, record)


def _jit_steps(run: _Run):
    """(train_fn, eval_fn): the run's train and eval steps, jitted over its mesh."""
    config, mesh = run.config, run.mesh
    t = config.train
    loss_cfg = LossConfig.from_config(config)
    train_fn = jit_train_step(mesh, bundle=run.bundle, tx=run.tx, loss_cfg=loss_cfg,
                              augment_cfg=config.augment, freeze_bn=bool(t.freeze_bn))
    eval_fn = jit_eval_step(mesh, bundle=run.bundle, loss_cfg=loss_cfg)
    return train_fn, eval_fn


def _save(loop: _Epochs, state, step: int, metrics: dict | None) -> None:
    _refuse_nonfinite(state, step)  # a NaN checkpoint would stop the resume, too
    meta = dict(loop.meta_base, progress=dataclasses.asdict(loop.progress))
    loop.ckpt.save(step, state, meta=meta, data_state=loop.run.iterator.get_state(),
                   metrics=metrics)


def _score_and_save(loop: _Epochs, state, step: int, record: dict) -> dict:
    """Adds the validation metrics to `record`, marks it best or not, logs and saves it."""
    run, t = loop.run, loop.run.config.train
    record.update(validate_epoch(loop.eval_fn, state, run.data, loop.gallery, t.batch_size,
                                 run.mesh))
    record["best"] = _update_best(loop.progress, record, t.monitor, step)
    loop.history.append(record)
    if run.primary:
        _log_epoch(record, loop.metrics_path, loop.writer, loop.history, run.workdir,
                   run.config.model.name)
    _save(loop, state, step, record if t.monitor in record else None)
    return record


def _epoch_zero(loop: _Epochs, state, step: int) -> dict:
    # Epoch 0: the starting model is scored and saved as a candidate for "best". With
    # epochs=0 that is the whole run (pretrained baselines); from pretrained weights it
    # means training never makes the model worse silently: when no epoch beats the start,
    # the best checkpoint stays the starting point and the summary says so.
    return _score_and_save(loop, state, step, dict(epoch=0, step=step))


def _train_epoch(loop: _Epochs, state, step: int):
    """The steps of one epoch from `progress.step_in_epoch` on, with mid-epoch checkpoints;
    returns (state, step)."""
    run, progress, clock, writer = loop.run, loop.progress, loop.clock, loop.writer
    t, spe = run.config.train, run.steps_per_epoch
    bar = tqdm(total=spe, initial=progress.step_in_epoch,
               desc=f"epoch {progress.epoch + 1}/{t.epochs}", unit="step",
               disable=not run.primary, file=sys.stderr, dynamic_ncols=True,
               mininterval=1.0)
    pending: list[dict] = []
    clock.restart()
    while progress.step_in_epoch < spe:
        batch = to_global(next(run.iterator), run.mesh)
        state, step_metrics = loop.train_fn(state, batch, loop.run_key)
        pending.append(step_metrics)
        step += 1
        progress.step_in_epoch += 1
        clock.count()
        bar.update(1)
        last = progress.step_in_epoch == spe
        # Reading metrics waits for the device: one sync point per log interval (and after
        # the first step, so the compile is kept out of the images/s figure).
        if len(pending) >= t.log_every_steps or last or not clock.started:
            _drain(pending, progress)
            clock.mark()
            running = progress.loss_sum / max(progress.steps_summed, 1)
            bar.set_postfix(loss=f"{running:.4f}", **clock.postfix())
            if writer:
                scalars = {"train/loss_running": running,
                           "train/learning_rate": float(run.schedule(step - 1))}
                if not math.isnan(clock.rate):
                    scalars["train/images_per_s"] = clock.rate
                writer.scalars(step, scalars)
        if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0 and not last:
            _drain(pending, progress)
            _save(loop, state, step, None)
    bar.close()
    _drain(pending, progress)
    return state, step


def _end_epoch(loop: _Epochs, state, step: int, t_epoch: float) -> dict:
    """The epoch's record (training sums, then validation), logged and saved; resets the sums."""
    progress, clock = loop.progress, loop.clock
    progress.epoch += 1
    record = dict(epoch=progress.epoch, step=step,
                  train_loss=progress.loss_sum / max(progress.steps_summed, 1),
                  train_accuracy=progress.acc_sum / max(progress.steps_summed, 1),
                  learning_rate=float(loop.run.schedule(step - 1)),
                  images_per_s=None if math.isnan(clock.rate) else clock.rate,
                  epoch_time_s=time.perf_counter() - t_epoch)
    progress.step_in_epoch = progress.loss_sum = progress.acc_sum = 0
    progress.steps_summed = 0
    return _score_and_save(loop, state, step, record)


def _summary(loop: _Epochs, step: int, stopped_early: bool, record: dict) -> dict:
    run, ckpt, progress = loop.run, loop.ckpt, loop.progress
    config, t = run.config, run.config.train
    best_step = ckpt.best_step()
    return dict(
        workdir=run.workdir, epochs_run=progress.epoch, steps=step, stopped_early=stopped_early,
        monitor=t.monitor, best_value=progress.best_value, best_epoch=progress.best_epoch,
        best_step=best_step,
        kept_starting_point=bool(config.model.pretrained) and progress.epoch > 0
        and progress.best_epoch == 0 and progress.best_value is not None,
        best_checkpoint=(os.path.join(ckpt.directory, str(best_step))
                         if best_step is not None else None),
        final=record)


class _Throughput:
    """Training images/s between sync points, excluding the first (compiling) step."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.started = False
        self.rate = float("nan")
        self._images = 0
        self._since = 0.0

    def count(self) -> None:
        self._images += self.batch_size

    def postfix(self) -> dict:
        """The progress bar's images/s entry: none until a rate is measured (the first step
        compiles and is not timed), never 'nan'."""
        return {} if math.isnan(self.rate) else {"img_s": f"{self.rate:.0f}"}

    def restart(self) -> None:
        """Starts a new interval without a rate (after evaluation and checkpointing)."""
        self._since, self._images = time.perf_counter(), 0

    def mark(self) -> None:
        now = time.perf_counter()
        if self.started and now > self._since:
            self.rate = self._images / (now - self._since)
        self.started, self._since, self._images = True, now, 0


def validate_config(config) -> None:
    """Refuses bad train/model settings (and a missing weights file) before any data is read."""
    t = config.train
    for name in ("batch_size", "log_every_steps"):
        if int(t[name]) <= 0:
            raise ConfigError(f"train.{name} must be > 0, got {t[name]}")
    # epochs=0: no training; the initial model is evaluated and saved (pretrained baselines).
    for name in ("epochs", "checkpoint_every_steps", "max_steps_per_epoch",
                 "early_stopping_patience"):
        if int(t[name]) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {t[name]}")
    if t.monitor not in ckpt_lib.MONITORS:
        raise ConfigError(f"train.monitor must be one of {tuple(ckpt_lib.MONITORS)}, "
                          f"got {t.monitor!r}")
    state_lib.compute_dtype(t.compute_dtype)
    if t.head_init not in ("random", "imprint"):
        raise ConfigError(f"train.head_init must be 'random' or 'imprint', got {t.head_init!r}")
    if t.head_init == "imprint" and config.model.head != "cosine":
        raise ConfigError("train.head_init='imprint' needs model.head='cosine'")
    state_lib.resolve_input(config)  # model name, weights source, input size
    LossConfig.from_config(config)
    pretrained_path(config.model)


def _remove_empty(path: str) -> None:
    """Removes `path` if it is an empty folder (what a run that failed to start created)."""
    try:
        os.rmdir(path)
    except OSError:
        pass  # missing or not empty: nothing of ours to tidy


class Diverged(TrainingError):
    """A non-finite loss or model; `train_and_evaluate` adds what to run next.

    `epoch`, `step_in_epoch`: where a non-finite loss appeared (the step's loss is computed
    from the parameters of the checkpoint step `epoch * steps_per_epoch + step_in_epoch - 1`).
    """

    def __init__(self, message: str, epoch: int | None = None, step_in_epoch: int = 0):
        super().__init__(message)
        self.epoch, self.step_in_epoch = epoch, step_in_epoch


def _divergence_advice(e: Diverged, config, ckpt: ckpt_lib.RunCheckpoints,
                       steps_per_epoch: int) -> str:
    """`e`'s message plus what to run, and where that resumes. A learning-rate change is
    allowed on resume (checkpoint.RESUMABLE_FIELDS); warm-up reshapes the schedule from step 0,
    so it is not. A checkpoint whose own parameters gave the non-finite loss would give it
    again at any learning rate: the advice is then to delete it first."""
    latest = ckpt.latest_step()
    lower = (f"run the same command with a lower --config.train.learning_rate (it is "
             f"{float(config.train.learning_rate):g})")
    text = f"{e}; nothing after it was saved."
    resume_from = latest
    if latest is None:
        text += f" To start over, {lower}"
    elif e.epoch is not None and latest == e.epoch * steps_per_epoch + e.step_in_epoch - 1:
        earlier = [s for s in ckpt.all_steps() if s < latest]
        resume_from = max(earlier) if earlier else None
        text += (f" That loss came from the parameters of the latest checkpoint, which any "
                 f"learning rate would repeat: delete {ckpt.step_dir(latest)}, then {lower}; "
                 + (f"it resumes from step {resume_from}" if earlier else "it starts over"))
    else:
        text += f" To resume from step {latest}, the latest checkpoint, {lower}"
    if resume_from is None:
        return text + " (warm-up, train.warmup_epochs, may be added too)"
    return text + ". Adding warm-up (train.warmup_epochs) means starting over in a new --workdir"


def _refuse_nonfinite(state, step: int) -> None:
    """Raises Diverged when the parameters, statistics or optimizer state about to be saved
    hold NaN/inf (an update can blow up after the last finite loss)."""
    bad = ckpt_lib.nonfinite_leaves({"params": state.params, "batch_stats": state.batch_stats,
                                     "opt_state": state.opt_state})
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise Diverged(f"the model became non-finite by step {step} ({shown})")


def _drain(pending: list[dict], progress: Progress) -> None:
    """Moves finished steps' metrics into the epoch's running sums (host floats)."""
    if not pending:
        return
    values = jax.device_get(pending)
    for i, v in enumerate(values):
        if not math.isfinite(float(v["loss"])):
            # Stop at once: more steps would only overwrite good checkpoints with NaNs.
            at = progress.step_in_epoch - len(values) + i + 1
            raise Diverged(f"the training loss became {float(v['loss'])} at step {at} of "
                           f"epoch {progress.epoch + 1}", progress.epoch, at)
        progress.loss_sum += float(v["loss"])
        progress.acc_sum += float(v["accuracy"])
        progress.steps_summed += 1
    pending.clear()


def _gallery_sample(data: PreparedData, seed: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(image rows, labels) of the training images used as the retrieval gallery."""
    n = len(data.train)
    if limit <= 0 or n <= limit:
        pick = np.arange(n)
    else:
        pick = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    return data.train.indices[pick], data.train.labels[pick]


def _embed_split(eval_fn, state, images, indices, labels, batch_size, mesh):
    """(loss sum, correct, count, embeddings [N,D] in `indices` order)."""
    loss = correct = count = 0.0
    chunks = []
    size = -(-batch_size // mesh.devices.size) * mesh.devices.size  # eval_batches' global size
    for start, batch in zip(range(0, len(indices), size),
                            eval_batches(images, indices, batch_size, mesh, labels=labels)):
        valid = np.arange(size) < len(indices) - start
        out = jax.device_get(eval_fn(state, batch))
        loss += float(out["loss_sum"])
        correct += float(out["correct"])
        count += float(out["count"])
        chunks.append(np.asarray(out["embedding"])[valid])
    emb = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)
    return loss, correct, count, emb


def validate_epoch(eval_fn, state, data: PreparedData, gallery, batch_size: int, mesh) -> dict:
    """The per-epoch validation: loss/accuracy and retrieval Top-k at ckpt_lib.VAL_KS (val
    queries vs the training gallery)."""
    if len(data.val) == 0:
        return {}
    v_loss, v_correct, v_count, q_emb = _embed_split(
        eval_fn, state, data.images, data.val.indices, data.val.labels, batch_size, mesh)
    _, _, _, g_emb = _embed_split(eval_fn, state, data.images, gallery[0], gallery[1],
                                  batch_size, mesh)
    out = dict(val_loss=v_loss / v_count, val_accuracy=v_correct / v_count)
    out.update(retrieval_scores(q_emb, data.val.labels, g_emb, gallery[1]))
    return out


def retrieval_scores(q_emb, q_labels, g_emb, g_labels) -> dict:
    """val_top{k} for k in ckpt_lib.VAL_KS (hit rates) and val_map_r (mAP@R, R = the query's
    relevant count in the gallery; queries with none are left out) of exact search."""
    q_labels, g_labels = np.asarray(q_labels), np.asarray(g_labels)
    num_rel = count_relevant(q_labels, g_labels)
    # Deep enough for mAP@R.
    k = min(max(max(ckpt_lib.VAL_KS), int(num_rel.max(initial=0))), len(g_emb))
    rows, _ = ExactSearcher(g_emb).search(q_emb, k)
    rel = relevance(g_labels[rows], q_labels)
    out = {}
    for kk in ckpt_lib.VAL_KS:
        if kk <= k:
            out[f"val_top{kk}"] = float(hit_at_k(rel, kk).mean())
    ap = average_precision_at_r(rel, num_rel)
    if np.isfinite(ap).any():
        out["val_map_r"] = float(np.nanmean(ap))
    return out


def _update_best(progress: Progress, record: dict, monitor: str, step: int) -> bool:
    value = record.get(monitor)
    if value is None:
        return False
    better = (progress.best_value is None
              or (value > progress.best_value if ckpt_lib.MONITORS[monitor] == "max"
                  else value < progress.best_value))
    if better:
        progress.best_value, progress.best_epoch, progress.best_step = value, record["epoch"], step
        progress.bad_epochs = 0
    else:
        progress.bad_epochs += 1
    return better


def _write_run_files(workdir, config, class_names, history, metrics_path) -> None:
    os.makedirs(workdir, exist_ok=True)
    _write_text(os.path.join(workdir, CONFIG_JSON), to_json(config) + "\n")
    _write_text(os.path.join(workdir, CLASSES_JSON), json.dumps(list(class_names)) + "\n")
    # Lines past the checkpoint we resume from belong to steps that are about to be redone.
    _write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))


def _write_text(path: str, text: str) -> None:
    write_file_atomic(path, text.encode())


def _read_history(path: str, max_step: int) -> list[dict]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut short by the kill
            if r.get("step", 0) <= max_step:
                out.append(r)
    return out


def _log_epoch(record, metrics_path, writer, history, workdir, title) -> None:
    with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer:
        writer.scalars(record["step"], {f"epoch/{k}": v for k, v in record.items()
                                        if isinstance(v, float)})
    plot_history(history, os.path.join(workdir, PLOTS_DIR), title)
    shown = ", ".join(f"{k} {record[k]:.4f}" for k in
                      ("train_loss", "train_accuracy", "val_loss", "val_accuracy",
                       *(f"val_top{k}" for k in ckpt_lib.VAL_KS), "val_map_r")
                      if record.get(k) is not None)
    print(f"epoch {record['epoch']}: {shown}" + (" (best)" if record["best"] else ""),
          flush=True)


def _print_summary(s: dict) -> None:
    best = "n/a" if s["best_value"] is None else f"{s['best_value']:.4f}"
    print(f"done: {s['epochs_run']} epochs, {s['steps']} steps in {s['train_time_s']:.0f}s"
          + (" (stopped early)" if s["stopped_early"] else ""), flush=True)
    print(f"best {s['monitor']} {best} at epoch {s['best_epoch']}, saved at training step "
          f"{s['best_step']} (checkpoint folders are named by step, not epoch): "
          f"{s['best_checkpoint']}", flush=True)
    if s.get("kept_starting_point"):
        print(f"note: training did not beat the starting point: no epoch of {s['epochs_run']} "
              f"improved {s['monitor']} over the pretrained model (epoch 0), so the best "
              f"checkpoint is the untrained model; export, index and search use it. Try a lower "
              f"train.learning_rate or train.head_init=imprint, or keep epochs=0", flush=True)
