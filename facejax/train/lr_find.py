"""fastai-style LR finder: an exponential LR sweep, the smoothed loss curve, and suggestions.

Trains a throw-away copy of the config's model (pretrained weights and fine-tuning policy
included) for up to `num_steps` steps while the LR grows from `start_lr` to `end_lr`
geometrically; stops when the smoothed loss exceeds 4x its minimum (fastai's `stop_div`).
Suggestions, as fastai computes them on the smoothed curve:
- `steep`: the LR where the loss falls fastest (minimum of d loss / d log lr) — the headline;
- `valley`: half way along the longest decreasing stretch (fastai's default since v2.6);
- `minimum`: the LR of the lowest loss, divided by 10.
"""

from __future__ import annotations

import copy
import json
import math
import os

import jax
import numpy as np

from facejax.atomic import atomic_path
from facejax.convert.weights import load_from_config
from facejax.data.pipeline import create_train_iterator, to_global
from facejax.data.prepare import PreparedData, prepare_data
from facejax.errors import ConfigError
from facejax.rundir import check_workdir, make_workdir
from facejax.sharding import make_data_mesh
from facejax.train import state as state_lib
from facejax.train.batch import fit_batch_to_data
from facejax.train.loop import validate_config
from facejax.train.losses import LossConfig
from facejax.train.scratch import unfreeze_without_weights
from facejax.train.mesh import is_primary, replicate
from facejax.train.step import jit_train_step

SMOOTHING = 0.98  # fastai's exponential moving average of the loss (debiased)
DIVERGENCE = 4.0
SKIP_END = 5  # fastai drops the last points (they are usually the divergence)


def lr_find(config, out_dir: str, *, start_lr: float = 1e-7, end_lr: float = 10.0,
            num_steps: int = 100, data: PreparedData | None = None) -> dict:
    """Runs the sweep; writes `lr_find.png` and `lr_find.json` to `out_dir`; returns the result."""
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"need 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    if num_steps < 2 * SKIP_END + 2:
        raise ConfigError(f"num_steps must be >= {2 * SKIP_END + 2}, got {num_steps}")
    out_dir = check_workdir(out_dir)
    config = copy.deepcopy(config)
    config.train.schedule = "constant"  # no one-cycle momentum: the sweep owns the LR
    config.train.warmup_epochs = 0.0
    unfreeze_without_weights(config, quiet=not is_primary())
    validate_config(config)
    data = data if data is not None else prepare_data(config.data)
    mesh = make_data_mesh()
    fit_batch_to_data(config, len(data.train), mesh.devices.size, quiet=not is_primary())
    model = state_lib.build_model(config, data.num_classes,
                                  dtype=state_lib.compute_dtype(config.train.compute_dtype))
    if config.model.pretrained:
        load_from_config(model, config.model)
    ratio = end_lr / start_lr

    def sweep(count):
        return start_lr * ratio ** (count / (num_steps - 1))

    state, bundle, tx, _ = state_lib.create_train_state(
        config, model, steps_per_epoch=num_steps, total_steps=num_steps, lr_schedule=sweep)
    fn = jit_train_step(mesh, bundle=bundle, tx=tx, loss_cfg=LossConfig.from_config(config),
                        augment_cfg=config.augment, freeze_bn=bool(config.train.freeze_bn))
    state = replicate(state, mesh)
    key = replicate(jax.random.key_data(jax.random.key(config.seed)), mesh)
    iterator = create_train_iterator(data.images, data.train, config)
    lrs, raw, smooth = [], [], []
    avg, best = 0.0, math.inf
    for i in range(num_steps):
        state, metrics = fn(state, to_global(next(iterator), mesh), key)
        loss = float(metrics["loss"])
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        smoothed = avg / (1 - SMOOTHING ** (i + 1))
        lrs.append(float(sweep(i)))
        raw.append(loss)
        smooth.append(smoothed)
        best = min(best, smoothed)
        if not math.isfinite(loss) or smoothed > DIVERGENCE * best:
            break
    result = dict(lrs=lrs, losses=raw, smoothed=smooth, **suggestions(lrs, smooth))
    if is_primary():
        make_workdir(out_dir)
        with open(os.path.join(out_dir, "lr_find.json"), "w") as f:
            json.dump(result, f, indent=1)
        plot(result, os.path.join(out_dir, "lr_find.png"))
    return result


def suggestions(lrs, smoothed) -> dict:
    """fastai's steep / valley / minimum suggestions on the smoothed curve (ends trimmed)."""
    lrs = np.asarray(lrs[:-SKIP_END] if len(lrs) > SKIP_END + 2 else lrs, np.float64)
    losses = np.asarray(smoothed[:len(lrs)], np.float64)
    finite = np.isfinite(losses)
    lrs, losses = lrs[finite], losses[finite]
    if len(lrs) < 3:
        return dict(steep=None, valley=None, minimum=None, suggestion=None)
    grads = np.diff(losses) / np.diff(np.log(lrs))
    steep = float(lrs[int(np.argmin(grads))])
    minimum = float(lrs[int(np.argmin(losses))] / 10)
    # valley (fastai): the longest decreasing subsequence, then half way along it.
    n = len(losses)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    valley = float(lrs[max_start + int(sections) + int(sections / 2)])
    return dict(steep=steep, valley=valley, minimum=minimum, suggestion=steep)


def advice(result: dict, config_path: str, out_dir: str, current_lr: float) -> str:
    """What to do with a sweep's result: the learning rate to train with (the steepest-descent
    suggestion, fastai's headline), the flag that takes it, and the other candidates."""
    steps = f"{len(result['lrs'])} sweep steps"
    plot_line = f"plot: {os.path.join(out_dir, 'lr_find.png')}"
    if result.get("suggestion") is None:
        return (f"{steps}: too few before the loss diverged to suggest a learning rate. Rerun "
                f"with more --steps or a lower --end-lr, or keep the config's "
                f"train.learning_rate ({current_lr:g}).\n{plot_line}")
    lr = f"{result['suggestion']:.2e}"
    return "\n".join([
        f"{steps}. Train with learning rate {lr} (where the loss falls fastest; the config "
        f"has {current_lr:g}):",
        f"  python scripts/train.py --config {config_path} --workdir RUN "
        f"--config.train.learning_rate={lr}",
        "  (with the same other --config overrides as here)",
        f"Other candidates: valley {result['valley']:.2e} (half way down the longest descent, "
        f"fastai's default), minimum/10 {result['minimum']:.2e}.",
        plot_line])


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(result["lrs"], result["smoothed"], label="smoothed loss")
    ax.plot(result["lrs"], result["losses"], alpha=0.3, label="loss")
    for name, marker in (("steep", "o"), ("valley", "s")):
        lr = result.get(name)
        if lr is not None:
            i = int(np.argmin(np.abs(np.log(result["lrs"]) - math.log(lr))))
            ax.plot([lr], [result["smoothed"][i]], marker, label=f"{name} {lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
